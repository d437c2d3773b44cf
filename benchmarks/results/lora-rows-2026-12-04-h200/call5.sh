# device call 5 (2026-12-04): the GQA shape (Llama-3-8B: 8 KV heads, k/v 1024 wide) 256 x 256 step, int8 rows, the
# row-chunk expand (the default) against the column tiles, two rounds alternated
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/c5; mkdir -p $H; R=benchmarks/results/lora-rows-2026-12-04-h200
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
timeout 160 python3 benchmarks/engine_tune_sweep.py --variants $R/variants-5-gqa.json --out $H/gqa --timeout 55 --warmup -- \
  --shape llama3-8b --batches 256 --adapters 256 --no-eager --steps 20 --rounds 3 --context 256 --pool-gb 54 \
  --adapter-dtype int8 > $H/gqa.log 2>&1; echo "gqa rc=$? at $((SECONDS-T0)) s"; grep -E "^\|" $H/gqa.log | tail -6
tar czf $OUT/c5.tgz -C /tmp c5
