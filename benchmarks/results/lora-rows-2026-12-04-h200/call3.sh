# device call 3 (2026-12-04): the row-chunk expand as the default (tiles of call 2's fastest): the GPU kernel tests
# (all but the column-tile variants, unchanged); the decode LoRA alone against the column tiles (ROWS False, the
# previous default) and tiles for one-module (o) launches (TUNE expand_decode_rows ONE); the engine's 256 x 256
# step against the column tiles (and the fastest ONE tiles if 1% ahead alone), alternated; the GPU engine tests
# (parity with transformers + peft, CUDA graphs)
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/c3; mkdir -p $H; R=benchmarks/results/lora-rows-2026-12-04-h200
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -m gpu -k "not decode_variants or dtype0-rows or dtype1-rows" > $H/tests-kernels.log 2>&1
echo "kernel tests rc=$? at $((SECONDS-T0)) s"; tail -1 $H/tests-kernels.log; grep -E "^FAILED|^E " $H/tests-kernels.log | head -6 | cut -c1-300
timeout 90 python3 benchmarks/bench_lora_decode.py --variants $R/variants-3-alone.json --out $H/alone --fence --split --rounds 5 \
  --token-order rank-desc > $H/alone.log 2>&1; echo "alone rc=$? at $((SECONDS-T0)) s"; grep -E "^\| |failed|rror" $H/alone.log | cut -c1-140
python3 $R/pick3.py $H/alone/lora_decode.json $R/variants-3-alone.json $H/variants-engine.json 3
LEFT=$((445 - SECONDS + T0)); echo "sweep budget $LEFT s"
timeout $LEFT python3 benchmarks/engine_tune_sweep.py --variants $H/variants-engine.json --out $H/sweep --timeout 75 --warmup -- \
  --shape llama7b --batches 256 --adapters 256 --no-eager --steps 20 --rounds 3 --context 256 --pool-gb 54 \
  --adapter-dtype int8 > $H/sweep.log 2>&1; echo "sweep rc=$? at $((SECONDS-T0)) s"; grep -E "^\|" $H/sweep.log | tail -10
tar czf $OUT/c3.tgz -C /tmp c3
LEFT=$((585 - SECONDS + T0)); echo "engine tests budget $LEFT s"
timeout $LEFT python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py > $H/tests-engine.log 2>&1
echo "engine tests rc=$? at $((SECONDS-T0)) s"; tail -1 $H/tests-engine.log; grep -E "^FAILED|^E " $H/tests-engine.log | head -6 | cut -c1-300
tar czf $OUT/c3.tgz -C /tmp c3
