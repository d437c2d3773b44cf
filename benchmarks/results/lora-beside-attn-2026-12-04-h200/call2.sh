# device call 2 (2026-12-04): kernel profiles of the 256 x 256 int8 step, unchunked vs LoRA beside chunked attention,
# to see which kernels the overlap slowed; then the GPU engine tests with the graph-capture spy fixed
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/c2; mkdir -p $H; R=benchmarks/results/lora-beside-attn-2026-12-04-h200
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
timeout 300 python3 benchmarks/engine_tune_sweep.py --variants $R/variants-2.json --out $H/sweep --timeout 90 --warmup -- \
  --shape llama7b --batches 256 --adapters 256 --no-eager --steps 10 --rounds 2 --context 256 --pool-gb 54 \
  --adapter-dtype int8 --profile 3 > $H/sweep.log 2>&1; echo "sweep rc=$? at $((SECONDS-T0)) s"; grep -E "^\||error|Error" $H/sweep.log | tail -8 | cut -c1-300
for v in off c161-normal c1331-normal; do echo "== $v"; head -30 $H/sweep/$v/profile-*lora*.txt | cut -c1-200; done
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py -k beside > $H/tests.log 2>&1
echo "tests rc=$? at $((SECONDS-T0)) s"; tail -2 $H/tests.log; grep -E "^FAILED|^E " $H/tests.log | head -8 | cut -c1-300
tar czf $OUT/c2.tgz -C /tmp c2
