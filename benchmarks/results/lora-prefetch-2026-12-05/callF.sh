# device call F (prepared 2026-12-05, not yet run: no device was lent): the fused decode kernel's variants (SUB,
# PREFETCH, G8: see the README) against the defaults, the decode LoRA alone with int4 and int8 rows, each variant
# side by side in one run; the engine step with each format's fastest variant; the GPU kernel tests with SUB 2,
# PREFETCH 3 and G8 on
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/cF; mkdir -p $H; R=benchmarks/results/lora-prefetch-2026-12-05
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; } | tee $H/machine.txt
A="--fence --rounds 3 --token-order rank-desc"
for dt in int4 int8; do
  [ $dt = int4 ] && LIM=200 || LIM=150    # (9 and 6 variants, each compiled on the device)
  timeout $LIM python3 benchmarks/bench_lora_decode.py --adapter-dtype $dt --variants $R/variants-F-$dt.json --out $H/alone-$dt $A \
    > $H/alone-$dt.log 2>&1; echo "alone $dt rc=$? at $((SECONDS-T0)) s"; grep -E "^\| |failed|rror" $H/alone-$dt.log | cut -c1-150
  tar czf $OUT/cF.tgz -C /tmp cF
done
# the engine step (256 x 256 and batch 1) with each format's fastest variant, if it won by 1% alone, against the defaults
E="--shape llama7b --batches 1,256 --adapters 256 --no-eager --steps 20 --rounds 2 --context 256 --pool-gb 54"
for dt in int4 int8; do
  LEFT=$((470 - SECONDS + T0)); [ $LEFT -lt 120 ] && break
  python3 $R/pick_best.py $H/alone-$dt/lora_decode.json $H/engine-variants-$dt.json || continue
  timeout $LEFT python3 benchmarks/engine_tune_sweep.py --variants $H/engine-variants-$dt.json --out $H/engine-$dt \
    --repeat 1 --timeout 100 -- $E --adapter-dtype $dt > $H/engine-$dt.log 2>&1
  echo "engine $dt rc=$? at $((SECONDS-T0)) s"; grep "^| " $H/engine-$dt.log | cut -c1-200
  tar czf $OUT/cF.tgz -C /tmp cF
done
echo '{"lora": {"fused_decode_int4": {"SUB": 2, "BLOCK_K": 1024, "PREFETCH": 3, "G8": true},
 "fused_decode_int8": {"SUB": 2, "BLOCK_K": 1024, "PREFETCH": 3, "G8": true}}}' > $H/tune-variants.json
LEFT=$((585 - SECONDS + T0)); [ $LEFT -lt 30 ] && exit 0
LORASERVE_KERNEL_TUNE=$H/tune-variants.json timeout $LEFT python3 -m pytest -q -p no:cacheprovider \
  tests/test_kernels.py -k "gpu_fused_decode" > $H/tests-variants.log 2>&1
echo "tests rc=$? at $((SECONDS-T0)) s"; tail -1 $H/tests-variants.log; grep -E "^FAILED|^E " $H/tests-variants.log | head -5 | cut -c1-300
tar czf $OUT/cF.tgz -C /tmp cF
