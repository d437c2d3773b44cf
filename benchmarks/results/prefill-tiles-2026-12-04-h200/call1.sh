#!/bin/bash
# device call 1: every prefill LoRA tile variant per case, shrink and expand apart
set -x
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > $OUT/machine.txt
python -c "import torch, triton; print(torch.__version__, triton.__version__)" >> $OUT/machine.txt
cat .commit >> $OUT/machine.txt
BENCH_COMMIT=$(cat .commit) python benchmarks/sweep_prefill_lora.py --out $OUT 2>&1 | tee $OUT/sweep.log | tail -60
