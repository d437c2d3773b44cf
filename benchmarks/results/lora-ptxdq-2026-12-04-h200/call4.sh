# device call 4 (2026-12-04, nineteenth session): int8 rows dequantized in PTX (PTX_DQ 1: fp32 FMAs; 2: the shrink's
# products in fp16x2): GPU kernel tests, the 32 layers of decode LoRA alone (fenced, split), then the engine step
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/c4; mkdir -p $H; R=benchmarks/results/lora-ptxdq-2026-12-04-h200
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -x -k "decode_variants" > $H/tests.log 2>&1
echo "tests rc=$? at $((SECONDS-T0)) s"; tail -2 $H/tests.log; grep -E "^FAILED|^E " $H/tests.log | head -8 | cut -c1-300
timeout 200 python3 benchmarks/bench_lora_decode.py --variants $R/variants-alone.json --out $H/alone --fence --split --rounds 5 \
  > $H/alone.log 2>&1; echo "alone rc=$? at $((SECONDS-T0)) s"; grep -E "^\| |failed|rror" $H/alone.log | cut -c1-230
LEFT=$((570 - SECONDS + T0)); echo "sweep budget $LEFT s"
if [ $LEFT -gt 90 ]; then
timeout $LEFT python3 benchmarks/engine_tune_sweep.py --variants $R/variants-engine.json --out $H/sweep --timeout 80 --warmup -- \
  --shape llama7b --batches 256 --adapters 256 --no-eager --steps 20 --rounds 3 --context 256 --pool-gb 54 \
  --adapter-dtype int8 > $H/sweep.log 2>&1; echo "sweep rc=$? at $((SECONDS-T0)) s"; grep -E "^\|" $H/sweep.log | tail -7
fi
tar czf $OUT/c4.tgz -C /tmp c4
