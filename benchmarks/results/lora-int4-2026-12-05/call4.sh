# device call 4 (2026-12-05, twenty-fifth session): the int4 row-chunk expand in PTX (_i4_fma: a byte's bits
# as a subnormal fp32 number, one prmt + one and per byte, exact products) on BLOCK_N 2048 tiles. GPU int4
# tests, the decode LoRA alone (int8 committed, int4 at seven variants), then the engine's 256 x 256 step:
# int4 and int8 rows alternated 3 times
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/c4; mkdir -p $H; R=benchmarks/results/lora-int4-2026-12-05
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_engine_gpu.py -m gpu \
  -k "int4 and not decode_variants" > $H/tests.log 2>&1
echo "tests rc=$? at $((SECONDS-T0)) s"; tail -1 $H/tests.log; grep -E "^FAILED|^E " $H/tests.log | head -8 | cut -c1-300
A="--fence --split --rounds 5 --token-order rank-desc"
timeout 60 python3 benchmarks/bench_lora_decode.py --adapter-dtype int8 --out $H/alone8 $A > $H/alone8.log 2>&1
echo "alone int8 rc=$? at $((SECONDS-T0)) s"; grep -E "^\| |failed|rror" $H/alone8.log | cut -c1-150
timeout 150 python3 benchmarks/bench_lora_decode.py --adapter-dtype int4 --variants $R/variants-4-alone.json --out $H/alone4 $A \
  > $H/alone4.log 2>&1; echo "alone int4 rc=$? at $((SECONDS-T0)) s"; grep -E "^\| |failed|rror" $H/alone4.log | cut -c1-150
tar czf $OUT/c4.tgz -C /tmp c4
E="--shape llama7b --batches 256 --adapters 256 --no-eager --steps 20 --rounds 3 --context 256 --pool-gb 54"
for k in 1 2 3; do for dt in int4 int8; do
  LEFT=$((575 - SECONDS + T0)); [ $LEFT -lt 45 ] && break 2
  timeout $LEFT python3 benchmarks/bench_engine.py $E --adapter-dtype $dt --out $H/engine-$dt-$k > $H/engine-$dt-$k.log 2>&1
  echo "engine $dt $k rc=$? at $((SECONDS-T0)) s"; grep -A2 "^ms per step\|^device ms" $H/engine-$dt-$k.log | grep "graph"
done; done
tar czf $OUT/c4.tgz -C /tmp c4
