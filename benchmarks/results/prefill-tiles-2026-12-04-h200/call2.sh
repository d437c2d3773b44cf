#!/bin/bash
# device call 2: prefill LoRA, new tile rules vs the old ones, alternated; GPU kernel tests
D=benchmarks/results/prefill-tiles-2026-12-04-h200
C=8:1:64,64:1:64,512:1:64,512:8:0,1024:4:0,4096:1:64,4096:64:0
cat .commit > $OUT/machine.txt
for r in 1 2; do
  BENCH_COMMIT=$(cat .commit) python benchmarks/bench_kernels.py --only prefill_lora --adapters 64 --prefill-cases $C --out $OUT/new$r 2>&1 | grep prefill_lora | tee $OUT/new$r.log
  LORASERVE_KERNEL_TUNE=$D/old.json BENCH_COMMIT=$(cat .commit) python benchmarks/bench_kernels.py --only prefill_lora --adapters 64 --prefill-cases $C --out $OUT/old$r 2>&1 | grep prefill_lora | tee $OUT/old$r.log
done
python -m pytest -q -m gpu tests/test_kernels.py -k "lora_llama7b or fused_modules" 2>&1 | tail -3 | tee $OUT/tests.log
