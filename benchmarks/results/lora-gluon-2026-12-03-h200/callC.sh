# device call C (2026-12-03, eighteenth session): occupancy variants of the Gluon warp-specialized TMA decode kernels
# (kernels/gluon_lora.py) after two fixes: the consumers sync their warps before releasing a
# stage (one thread arrives: without the sync a fast warp released it early), and the shrink holds
# all BR rows in-thread so a converted x element serves BR weights; 256 x 256 alone and engine
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/c; mkdir -p $H; R=benchmarks/results/lora-gluon-2026-12-03-h200
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -x -k "gpu_decode_variants and gluon" > $H/tests.log 2>&1
echo "tests rc=$? at $((SECONDS-T0)) s"; tail -2 $H/tests.log; grep -E "^FAILED|Error|error" $H/tests.log | head -8 | cut -c1-400
timeout 170 python3 benchmarks/bench_lora_decode.py --variants $R/variants-C.json --out $H/fence --fence --split --rounds 5 \
  > $H/fence.log 2>&1; echo "fence rc=$? at $((SECONDS-T0)) s"; grep -E "^\| |failed" $H/fence.log | cut -c1-230
LEFT=$((560 - SECONDS + T0)); echo "sweep budget $LEFT s"
if [ $LEFT -gt 120 ]; then
timeout $LEFT python3 benchmarks/engine_tune_sweep.py --variants $R/variants-C-engine.json --out $H/sweep --timeout 75 --warmup -- \
  --shape llama7b --batches 256 --adapters 256 --no-eager --steps 20 --rounds 3 --context 256 --pool-gb 54 \
  --adapter-dtype int8 > $H/sweep.log 2>&1; echo "sweep rc=$? at $((SECONDS-T0)) s"; tail -7 $H/sweep.log | cut -c1-300
fi
tar czf $OUT/c.tgz -C /tmp c
