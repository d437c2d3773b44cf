# device call 3 (2026-12-04): the engine's 256 x 256 step, committed kernels vs BIAS with BLOCK_R 32, four rounds alternated
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/c3; mkdir -p $H; R=benchmarks/results/lora-bias-2026-12-04-h200
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
timeout 560 python3 benchmarks/engine_tune_sweep.py --variants $R/variants-3-engine.json --out $H/sweep --timeout 75 --warmup -- \
  --shape llama7b --batches 256 --adapters 256 --no-eager --steps 20 --rounds 3 --context 256 --pool-gb 54 \
  --adapter-dtype int8 > $H/sweep.log 2>&1; echo "sweep rc=$? at $((SECONDS-T0)) s"; grep -E "^\|" $H/sweep.log | tail -10
tar czf $OUT/c3.tgz -C /tmp c3
