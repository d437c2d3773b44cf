# device call 6 (2026-12-04): PTX_DQ 2 now the shrink's default: the GPU engine tests with int8 rows (against PEFT),
# then the engine step, three rounds alternated: PTX_DQ 0 (the previous default) vs 2 vs 2 with PIPE 3
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/c6; mkdir -p $H; R=benchmarks/results/lora-ptxdq-2026-12-04-h200
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py -x -k "int8" > $H/tests.log 2>&1
echo "tests rc=$? at $((SECONDS-T0)) s"; tail -2 $H/tests.log; grep -E "^FAILED|^E " $H/tests.log | head -8 | cut -c1-300
LEFT=$((540 - SECONDS + T0)); echo "sweep budget $LEFT s"
timeout $LEFT python3 benchmarks/engine_tune_sweep.py --variants $R/variants-engine6.json --out $H/sweep --timeout 80 --warmup -- \
  --shape llama7b --batches 256 --adapters 256 --no-eager --steps 20 --rounds 3 --context 256 --pool-gb 54 \
  --adapter-dtype int8 > $H/sweep.log 2>&1; echo "sweep rc=$? at $((SECONDS-T0)) s"; grep -E "^\|" $H/sweep.log | tail -11
tar czf $OUT/c6.tgz -C /tmp c6
