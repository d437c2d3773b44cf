# device call D (2026-12-05): the fused decode LoRA on its final tiles: GPU tests (kernels at Llama-7B and GQA
# shapes, engine vs transformers + peft with int8 and int4 rows), the decode LoRA alone with tiles for o beside
# them, the engine step (int4, int8: fused vs split), then int4 prefill kernel timings
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/cD; mkdir -p $H; R=benchmarks/results/lora-fused-2026-12-05
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; } | tee $H/machine.txt
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_engine_gpu.py \
  -k "fused_decode or int4_adapter or int8_adapter" > $H/tests.log 2>&1
echo "tests rc=$? at $((SECONDS-T0)) s"; tail -1 $H/tests.log; grep -E "^FAILED|^E " $H/tests.log | head -8 | cut -c1-300
tar czf $OUT/cD.tgz -C /tmp cD
A="--fence --rounds 3 --token-order rank-desc"
for dt in int4 int8; do
  timeout 100 python3 benchmarks/bench_lora_decode.py --adapter-dtype $dt --variants $R/variants-D-$dt.json --out $H/alone-$dt $A \
    > $H/alone-$dt.log 2>&1; echo "alone $dt rc=$? at $((SECONDS-T0)) s"; grep -E "^\| |failed|rror" $H/alone-$dt.log | cut -c1-150
  tar czf $OUT/cD.tgz -C /tmp cD
done
E="--shape llama7b --batches 1,256 --adapters 256 --no-eager --steps 20 --rounds 2 --context 256 --pool-gb 54"
for dt in int4 int8; do
  LEFT=$((445 - SECONDS + T0)); [ $LEFT -lt 120 ] && break
  timeout $LEFT python3 benchmarks/engine_tune_sweep.py --variants $R/variants-D-engine.json --out $H/engine-$dt \
    --repeat 1 --timeout 100 -- $E --adapter-dtype $dt > $H/engine-$dt.log 2>&1
  echo "engine $dt rc=$? at $((SECONDS-T0)) s"; grep "^| " $H/engine-$dt.log | cut -c1-200
  tar czf $OUT/cD.tgz -C /tmp cD
done
LEFT=$((470 - SECONDS + T0))
[ $LEFT -gt 30 ] && timeout $LEFT python3 benchmarks/bench_kernels.py --adapter-dtype int4 --only prefill_lora --out $H/prefill-int4 \
  > $H/prefill-int4.log 2>&1; echo "prefill int4 rc=$? at $((SECONDS-T0)) s"; tail -15 $H/prefill-int4.log | cut -c1-200
tar czf $OUT/cD.tgz -C /tmp cD
