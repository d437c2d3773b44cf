# device call 1 (2026-12-04): the segment-loop expand (TUNE key SEG) on the GPU kernel tests, then the decode
# LoRA alone: the committed tiles vs ten SEG tiles
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/c1; mkdir -p $H; R=benchmarks/results/lora-segment-2026-12-04-h200
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -x -k "variants and segment" > $H/tests-kernels.log 2>&1
echo "kernel tests rc=$? at $((SECONDS-T0)) s"; tail -1 $H/tests-kernels.log; grep -E "^FAILED|^E " $H/tests-kernels.log | head -6 | cut -c1-300
timeout 400 python3 benchmarks/bench_lora_decode.py --variants $R/variants-1.json --out $H/alone --fence --split --rounds 3 \
  > $H/alone.log 2>&1; echo "alone rc=$? at $((SECONDS-T0)) s"; grep -E "^\| |failed|rror" $H/alone.log | cut -c1-160
tar czf $OUT/c1.tgz -C /tmp c1
