# device call A (2026-12-05): the fused decode LoRA (one launch per group: shrink and expand by rank-row chunks)
# on the GPU: its tests, the decode LoRA alone (int4 and int8 rows, fused vs split), the engine step (int4)
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/cA; mkdir -p $H; R=benchmarks/results/lora-fused-2026-12-05
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; } | tee $H/machine.txt
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_engine_gpu.py \
  -k "fused_decode or int4_adapter or int8_adapter" > $H/tests.log 2>&1
echo "tests rc=$? at $((SECONDS-T0)) s"; tail -1 $H/tests.log; grep -E "^FAILED|^E " $H/tests.log | head -8 | cut -c1-300
tar czf $OUT/cA.tgz -C /tmp cA
A="--fence --rounds 3 --token-order rank-desc"
for dt in int4 int8; do
  timeout 130 python3 benchmarks/bench_lora_decode.py --adapter-dtype $dt --variants $R/variants-A-$dt.json --out $H/alone-$dt $A \
    > $H/alone-$dt.log 2>&1; echo "alone $dt rc=$? at $((SECONDS-T0)) s"; grep -E "^\| |failed|rror" $H/alone-$dt.log | cut -c1-140
  tar czf $OUT/cA.tgz -C /tmp cA
done
LEFT=$((560 - SECONDS + T0))
timeout $LEFT python3 benchmarks/engine_tune_sweep.py --variants $R/variants-A-engine.json --out $H/engine --repeat 2 \
  --timeout 110 -- --shape llama7b --batches 1,256 --adapters 256 --no-eager --steps 20 --rounds 2 --context 256 \
  --pool-gb 54 --adapter-dtype int4 > $H/engine.log 2>&1
echo "engine rc=$? at $((SECONDS-T0)) s"; tail -12 $H/engine.log | cut -c1-200
tar czf $OUT/cA.tgz -C /tmp cA
