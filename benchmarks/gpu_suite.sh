#!/usr/bin/env bash
# One device call that checks and times the GPU path (results under $OUT, at most 8 files):
#   1. decode-LoRA kernel sweep + table (bench_kernels.py --sweep --only decode_lora): tune.json
#   2. GPU tests with those tiles (kernels at Llama-7B shapes, engine graph/eager vs transformers+peft)
#   3. q/k/v LoRA in one launch vs three (bench_kernels.py --only fused_lora)
#   4. engine step (bench_engine.py): base vs LoRA over 256 / 16 / 1 adapters, CUDA-graph decode
#      steps and eager mixed steps (4 prompts of 256 tokens beside the decode batch)
#   tune-sweep (not in the default set): the engine step under each TUNE override of $VARIANTS
#      (default benchmarks/tune/decode-pipe.json), int8 then fp16 rows (engine_tune_sweep.py,
#      --rounds 3), then the GPU tests of the decode variants (~25 s a variant and dtype, + 1 min)
#     OUT=/tmp/out bash benchmarks/gpu_suite.sh [kernels] [tests] [fused] [engine] [tune-sweep]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT}
STAGES=${*:-kernels tests fused engine}
for s in $STAGES; do
  case $s in
    kernels) timeout 240 python3 benchmarks/bench_kernels.py --out "$OUT/kernels" --sweep --only decode_lora \
               > "$OUT/kernels.log" 2>&1; echo "kernels rc=$?" ;;
    tests) TUNE=$OUT/kernels/tune.json; [ -f "$TUNE" ] && export LORASERVE_KERNEL_TUNE=$TUNE
           timeout 360 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_engine_gpu.py \
             tests/test_engine.py > "$OUT/gpu-tests.log" 2>&1; echo "tests rc=$?"; tail -3 "$OUT/gpu-tests.log" ;;
    fused) TUNE=$OUT/kernels/tune.json; [ -f "$TUNE" ] && export LORASERVE_KERNEL_TUNE=$TUNE
           timeout 180 python3 benchmarks/bench_kernels.py --out "$OUT/fused" --only fused_lora --adapters 300 \
             > "$OUT/fused.log" 2>&1; echo "fused rc=$?"; grep "^fused_lora" "$OUT/fused.log" ;;
    engine) TUNE=$OUT/kernels/tune.json; [ -f "$TUNE" ] && export LORASERVE_KERNEL_TUNE=$TUNE
            timeout 300 python3 benchmarks/bench_engine.py --shape llama7b --batches 1,32,128,256 --adapters 256 \
              --spread 16,1 --no-eager --steps 10 --context 256 --pool-gb 54 --prefill 4x256 --out "$OUT/engine" \
              > "$OUT/engine.log" 2>&1; echo "engine rc=$?"; tail -8 "$OUT/engine.log" ;;
    tune-sweep)
      for dt in int8 auto; do
        timeout 280 python3 benchmarks/engine_tune_sweep.py --variants "${VARIANTS:-benchmarks/tune/decode-pipe.json}" \
          --out "$OUT/sweep-$dt" -- --shape llama7b --batches 1,256 --adapters 256 --no-eager --steps 10 --rounds 3 \
          --context 256 --pool-gb 54 --adapter-dtype $dt > "$OUT/sweep-$dt.log" 2>&1
        echo "sweep $dt rc=$?"; grep "^|" "$OUT/sweep-$dt.log"
      done
      timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "variants" \
        > "$OUT/variant-tests.log" 2>&1; echo "variant tests rc=$?"; tail -2 "$OUT/variant-tests.log" ;;
  esac
done
