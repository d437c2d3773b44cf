# device call 1 (2026-12-04, nineteenth session): decode LoRA on a side stream beside chunked attention
# (server/model.py _attention_beside_lora): GPU engine tests, then the 256 x 256 int8 engine step, variants alternated
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/c1; mkdir -p $H; R=benchmarks/results/lora-beside-attn-2026-12-04-h200
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py -x > $H/tests.log 2>&1
echo "tests rc=$? at $((SECONDS-T0)) s"; tail -2 $H/tests.log; grep -E "^FAILED|Error|error" $H/tests.log | head -8 | cut -c1-400
LEFT=$((565 - SECONDS + T0)); echo "sweep budget $LEFT s"
timeout $LEFT python3 benchmarks/engine_tune_sweep.py --variants $R/variants-1.json --out $H/sweep --timeout 80 --warmup -- \
  --shape llama7b --batches 256 --adapters 256 --no-eager --steps 20 --rounds 3 --context 256 --pool-gb 54 \
  --adapter-dtype int8 > $H/sweep.log 2>&1; echo "sweep rc=$? at $((SECONDS-T0)) s"; grep -E "^\||error|Error" $H/sweep.log | tail -12 | cut -c1-300
tar czf $OUT/c1.tgz -C /tmp c1
