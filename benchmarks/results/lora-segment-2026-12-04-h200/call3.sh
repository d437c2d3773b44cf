# device call 3 (2026-12-04): the decode expand's grid in descending rank order (TUNE key ORDER) through the GPU
# kernel tests; the decode LoRA alone with and without it; the engine's 256 x 256 step, two rounds alternated; the GPU engine tests with int8 rows with ORDER on
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/c3; mkdir -p $H; R=benchmarks/results/lora-segment-2026-12-04-h200
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
timeout 130 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -x -k "rank_order or (variants and rank-order) or (gpu_decode_variants and rank-order) or int8_decode" > $H/tests-kernels.log 2>&1
echo "kernel tests rc=$? at $((SECONDS-T0)) s"; tail -1 $H/tests-kernels.log; grep -E "^FAILED|^E " $H/tests-kernels.log | head -6 | cut -c1-300
LORASERVE_KERNEL_TUNE=$R/tune-order.json timeout 110 python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py -x -k "int8" \
  > $H/tests-engine-order.log 2>&1; echo "engine tests (ORDER on) rc=$? at $((SECONDS-T0)) s"; tail -1 $H/tests-engine-order.log
grep -E "^FAILED|^E " $H/tests-engine-order.log | head -6 | cut -c1-300
timeout 90 python3 benchmarks/bench_lora_decode.py --variants $R/variants-3-alone.json --out $H/alone --fence --split --rounds 5 \
  > $H/alone.log 2>&1; echo "alone rc=$? at $((SECONDS-T0)) s"; grep -E "^\| |failed|rror" $H/alone.log | cut -c1-150
LEFT=$((575 - SECONDS + T0)); echo "sweep budget $LEFT s"
timeout $LEFT python3 benchmarks/engine_tune_sweep.py --variants $R/variants-3-engine.json --out $H/sweep --timeout 80 --warmup -- \
  --shape llama7b --batches 256 --adapters 256 --no-eager --steps 20 --rounds 3 --context 256 --pool-gb 54 \
  --adapter-dtype int8 > $H/sweep.log 2>&1; echo "sweep rc=$? at $((SECONDS-T0)) s"; grep -E "^\|" $H/sweep.log | tail -8
tar czf $OUT/c3.tgz -C /tmp c3
