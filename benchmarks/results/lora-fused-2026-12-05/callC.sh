# device call C (2026-12-05): fused decode LoRA tiles (the shrink width per launch: BLOCK_K_MULTI for q/k/v; 256;
# expand widths and warps) alone, int4 and int8 rows; the engine step with int8 rows, fused tiles vs split
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/cC; mkdir -p $H; R=benchmarks/results/lora-fused-2026-12-05
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; } | tee $H/machine.txt
A="--fence --rounds 3 --token-order rank-desc"
for dt in int4 int8; do
  timeout 130 python3 benchmarks/bench_lora_decode.py --adapter-dtype $dt --variants $R/variants-C-$dt.json --out $H/alone-$dt $A \
    > $H/alone-$dt.log 2>&1; echo "alone $dt rc=$? at $((SECONDS-T0)) s"; grep -E "^\| |failed|rror" $H/alone-$dt.log | cut -c1-140
  tar czf $OUT/cC.tgz -C /tmp cC
done
LEFT=$((560 - SECONDS + T0))
timeout $LEFT python3 benchmarks/engine_tune_sweep.py --variants $R/variants-C-engine-int8.json --out $H/engine --repeat 2 --timeout 100 \
  -- --shape llama7b --batches 1,256 --adapters 256 --no-eager --steps 20 --rounds 2 --context 256 \
  --pool-gb 54 --adapter-dtype int8 > $H/engine.log 2>&1
echo "engine rc=$? at $((SECONDS-T0)) s"; tail -9 $H/engine.log | cut -c1-200
tar czf $OUT/cC.tgz -C /tmp cC
