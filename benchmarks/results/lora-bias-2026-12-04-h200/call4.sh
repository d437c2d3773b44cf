# device call 4 (2026-12-04): BIAS row groups held until every row has landed (HOLD), 8-tile groups (GROUP 8),
# BLOCK_R 16 vs 32: GPU kernel tests, the decode LoRA alone (rows by rank), the engine's 256 x 256 step for the
# fastest against the committed kernels (three rounds alternated), then the GPU engine tests
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/c4; mkdir -p $H; R=benchmarks/results/lora-bias-2026-12-04-h200
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -x -k "(gpu_decode_variants and biased) or int8_decode or lora_llama7b" > $H/tests-kernels.log 2>&1
echo "kernel tests rc=$? at $((SECONDS-T0)) s"; tail -1 $H/tests-kernels.log; grep -E "^FAILED|^E " $H/tests-kernels.log | head -6 | cut -c1-300
timeout 150 python3 benchmarks/bench_lora_decode.py --variants $R/variants-4-alone.json --out $H/alone --fence --split --rounds 5 \
  --token-order rank-desc > $H/alone.log 2>&1; echo "alone rc=$? at $((SECONDS-T0)) s"; grep -E "^\| |failed|rror" $H/alone.log | cut -c1-120
python3 $R/pick.py $H/alone/lora_decode.json $R/variants-4-alone.json $H/variants-engine.json
timeout 200 python3 benchmarks/engine_tune_sweep.py --variants $H/variants-engine.json --out $H/sweep --timeout 75 --warmup -- \
  --shape llama7b --batches 256 --adapters 256 --no-eager --steps 20 --rounds 3 --context 256 --pool-gb 54 \
  --adapter-dtype int8 > $H/sweep.log 2>&1; echo "sweep rc=$? at $((SECONDS-T0)) s"; grep -E "^\|" $H/sweep.log | tail -8
LEFT=$((585 - SECONDS + T0)); echo "engine tests budget $LEFT s"
timeout $LEFT python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py > $H/tests-engine.log 2>&1
echo "engine tests rc=$? at $((SECONDS-T0)) s"; tail -1 $H/tests-engine.log; grep -E "^FAILED|^E " $H/tests-engine.log | head -6 | cut -c1-300
tar czf $OUT/c4.tgz -C /tmp c4
