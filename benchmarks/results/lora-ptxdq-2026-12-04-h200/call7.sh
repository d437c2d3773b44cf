# device call 7 (2026-12-04): the new defaults (shrink PTX_DQ 2, PIPE 3) through the GPU kernel tests and the GPU
# engine tests with int8 rows; the decode LoRA alone: new vs previous defaults, and expand variants (ONE_SUM, PTX_DQ 1)
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/c7; mkdir -p $H; R=benchmarks/results/lora-ptxdq-2026-12-04-h200
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -x -k "decode or fused or grouped" > $H/tests-kernels.log 2>&1
echo "kernel tests rc=$? at $((SECONDS-T0)) s"; tail -1 $H/tests-kernels.log; grep -E "^FAILED|^E " $H/tests-kernels.log | head -6 | cut -c1-300
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py -x -k "int8" > $H/tests-engine.log 2>&1
echo "engine tests rc=$? at $((SECONDS-T0)) s"; tail -1 $H/tests-engine.log; grep -E "^FAILED|^E " $H/tests-engine.log | head -6 | cut -c1-300
timeout 150 python3 benchmarks/bench_lora_decode.py --variants $R/variants-final.json --out $H/alone --fence --split --rounds 5 \
  > $H/alone.log 2>&1; echo "alone rc=$? at $((SECONDS-T0)) s"; grep -E "^\| |failed|rror" $H/alone.log | cut -c1-140
tar czf $OUT/c7.tgz -C /tmp c7
