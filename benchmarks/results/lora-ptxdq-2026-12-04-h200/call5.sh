# device call 5 (2026-12-04): with the shrink's PTX_DQ 2, expand tiles whose reduction over rows stays in a thread
# (512 columns a warp), alone; then the engine step, alternated, committed vs PTX_DQ variants
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/c5; mkdir -p $H; R=benchmarks/results/lora-ptxdq-2026-12-04-h200
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
timeout 220 python3 benchmarks/bench_lora_decode.py --variants $R/variants-expand.json --out $H/alone --fence --split --rounds 5 \
  > $H/alone.log 2>&1; echo "alone rc=$? at $((SECONDS-T0)) s"; grep -E "^\| |failed|rror" $H/alone.log | cut -c1-150
LEFT=$((560 - SECONDS + T0)); echo "sweep budget $LEFT s"
timeout $LEFT python3 benchmarks/engine_tune_sweep.py --variants $R/variants-engine5.json --out $H/sweep --timeout 80 --warmup -- \
  --shape llama7b --batches 256 --adapters 256 --no-eager --steps 20 --rounds 3 --context 256 --pool-gb 54 \
  --adapter-dtype int8 > $H/sweep.log 2>&1; echo "sweep rc=$? at $((SECONDS-T0)) s"; grep -E "^\|" $H/sweep.log | tail -10
tar czf $OUT/c5.tgz -C /tmp c5
