# device call 8 (2026-12-05): int4 decode tiles around the committed ones (expand PIPE, BLOCK_R, one 4096-wide
# tile; shrink PIPE, BLOCK_K x warps, BLOCK_R), the decode LoRA alone at the Llama-7B shape and at GQA
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/c8; mkdir -p $H; R=benchmarks/results/lora-int4-2026-12-05
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; } | tee $H/machine.txt
A="--fence --split --rounds 3 --token-order rank-desc"
timeout 150 python3 benchmarks/bench_lora_decode.py --adapter-dtype int4 --variants $R/variants-8-alone.json --out $H/alone4 $A \
  > $H/alone4.log 2>&1; echo "alone int4 rc=$? at $((SECONDS-T0)) s"; grep -E "^\| |failed|rror" $H/alone4.log | cut -c1-150
tar czf $OUT/c8.tgz -C /tmp c8
timeout 120 python3 benchmarks/bench_lora_decode.py --adapter-dtype int4 --variants $R/variants-8-alone.json --out $H/gqa4 $A \
  --kv-heads 8 > $H/gqa4.log 2>&1; echo "gqa int4 rc=$? at $((SECONDS-T0)) s"; grep -E "^\| |failed|rror" $H/gqa4.log | cut -c1-150
tar czf $OUT/c8.tgz -C /tmp c8
