# device call E (2026-12-03, seventeenth session): the compact shrink grid at a smaller batch (64
# requests over as many adapters, Llama-7B, int8 rows), where its plan's fixed cost weighs more:
# full grid vs compact, alternated
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/e; mkdir -p $H; R=benchmarks/results/lora-persist-2026-12-03-h200
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
for B in 64; do
timeout 200 python3 benchmarks/engine_tune_sweep.py --variants $R/variants-D.json --out $H/sweep-$B --timeout 45 --warmup -- \
  --shape llama7b --batches $B --adapters $B --no-eager --steps 20 --rounds 3 --context 256 --pool-gb 54 \
  --adapter-dtype int8 > $H/sweep-$B.log 2>&1; echo "sweep $B rc=$? at $((SECONDS-T0)) s"; tail -6 $H/sweep-$B.log | cut -c1-300
done
tar czf $OUT/e.tgz -C /tmp e
