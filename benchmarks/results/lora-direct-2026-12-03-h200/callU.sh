# device call U (2026-12-03): DIRECT decode launches (each token's index entry read in one load,
# (calls S and T ran the same at dfb62d5 and 7f36721, where the computed row offsets broke the codegen: see README)
# row offsets computed where rows sit back to back) against the committed kernels, the engine's
# 32 layers of q/k/v + o decode LoRA alone (256 x 256, int8 rows), a one-element kernel before each
# group; then the CPU-sized direct tests compiled on the GPU
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/u; mkdir -p $H; R=benchmarks/results/lora-direct-2026-12-03-h200
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
timeout 200 python3 benchmarks/bench_lora_decode.py --variants $R/variants-S.json --out $H/fence --fence --split --rounds 7 \
  > $H/fence.log 2>&1; echo "fence rc=$? at $((SECONDS-T0)) s"; grep "^| " $H/fence.log | cut -c1-200
timeout 200 python3 benchmarks/bench_lora_decode.py --variants $R/variants-S.json --out $H/nofence --rounds 7 \
  > $H/nofence.log 2>&1; echo "nofence rc=$? at $((SECONDS-T0)) s"; grep "^| " $H/nofence.log | cut -c1-200
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "direct" > $H/tests.log 2>&1
echo "tests rc=$? at $((SECONDS-T0)) s"; tail -2 $H/tests.log
tar czf $OUT/u.tgz -C /tmp u
