# device call A (2026-12-03, seventeenth session): persistent decode LoRA kernels (a fixed grid
# walking a device-built plan of equal work items in one software-pipelined loop) against the
# committed kernels, the engine's 32 layers of q/k/v + o decode LoRA alone (256 x 256, int8 rows),
# fenced and not; then the decode-variant kernel tests (persistent ones included) on the GPU
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/a; mkdir -p $H; R=benchmarks/results/lora-persist-2026-12-03-h200
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
timeout 240 python3 benchmarks/bench_lora_decode.py --variants $R/variants-A.json --out $H/fence --fence --split --rounds 5 \
  > $H/fence.log 2>&1; echo "fence rc=$? at $((SECONDS-T0)) s"; grep -E "^\| |failed" $H/fence.log | cut -c1-220
timeout 150 python3 benchmarks/bench_lora_decode.py --variants $R/variants-A.json --out $H/nofence --rounds 5 \
  > $H/nofence.log 2>&1; echo "nofence rc=$? at $((SECONDS-T0)) s"; grep -E "^\| |failed" $H/nofence.log | cut -c1-160
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "decode_variants" > $H/tests.log 2>&1
echo "tests rc=$? at $((SECONDS-T0)) s"; tail -2 $H/tests.log; grep -E "^FAILED|Error" $H/tests.log | head -5 | cut -c1-300
tar czf $OUT/a.tgz -C /tmp a
