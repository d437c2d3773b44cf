# device call V (2026-12-03): cache policies for the int8 decode kernels' row loads (.cg: L2 only;
# L2 evict-first) against the committed loads, the engine's 32 layers of q/k/v + o decode LoRA
# alone (256 x 256), with and without a one-element kernel before each group; then the decode
# kernel tests with the policies' variants
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/v; mkdir -p $H; R=benchmarks/results/lora-cache-2026-12-03-h200
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
timeout 200 python3 benchmarks/bench_lora_decode.py --variants $R/variants-V.json --out $H/fence --fence --split --rounds 7 \
  > $H/fence.log 2>&1; echo "fence rc=$? at $((SECONDS-T0)) s"; grep "^| " $H/fence.log | cut -c1-200
timeout 200 python3 benchmarks/bench_lora_decode.py --variants $R/variants-V.json --out $H/nofence --rounds 7 \
  > $H/nofence.log 2>&1; echo "nofence rc=$? at $((SECONDS-T0)) s"; grep "^| " $H/nofence.log | cut -c1-200
tar czf $OUT/v.tgz -C /tmp v
