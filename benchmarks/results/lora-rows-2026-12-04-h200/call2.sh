# device call 2 (2026-12-04): row-chunk tiles around call 1's fastest (BLOCK_N 1024, 2 warps, G4) with PIPE 2 / 4,
# SPLIT 2, 4 warps: the decode LoRA alone (rows by rank), then the engine's 256 x 256 step for the fastest (five rounds alternated)
# against the committed kernels
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/c2; mkdir -p $H; R=benchmarks/results/lora-rows-2026-12-04-h200
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
timeout 170 python3 benchmarks/bench_lora_decode.py --variants $R/variants-2-alone.json --out $H/alone --fence --split --rounds 5 \
  --token-order rank-desc > $H/alone.log 2>&1; echo "alone rc=$? at $((SECONDS-T0)) s"; grep -E "^\| |failed|rror" $H/alone.log | cut -c1-140
python3 $R/pick.py $H/alone/lora_decode.json $R/variants-2-alone.json $H/variants-engine.json 5
LEFT=$((575 - SECONDS + T0)); echo "sweep budget $LEFT s"
timeout $LEFT python3 benchmarks/engine_tune_sweep.py --variants $H/variants-engine.json --out $H/sweep --timeout 75 --warmup -- \
  --shape llama7b --batches 256 --adapters 256 --no-eager --steps 20 --rounds 3 --context 256 --pool-gb 54 \
  --adapter-dtype int8 > $H/sweep.log 2>&1; echo "sweep rc=$? at $((SECONDS-T0)) s"; grep -E "^\|" $H/sweep.log | tail -8
tar czf $OUT/c2.tgz -C /tmp c2
