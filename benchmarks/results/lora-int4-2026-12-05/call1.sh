# device call 1 (2026-12-05): int4 adapter rows. GPU tests of every LoRA kernel with int4 rows (Llama-7B and GQA
# shapes, fp16/bf16) and the engine against peft on the int4-rounded weights; the decode LoRA alone (256 tokens x
# 256 adapters, q/k/v + o, 32 layers) with int8 rows (the committed kernels) and int4 rows at five tile variants;
# then the engine's 256 x 256 step over base with int4 and int8 rows (each run its own base step)
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/c1; mkdir -p $H; R=benchmarks/results/lora-int4-2026-12-05
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
timeout 140 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_engine_gpu.py -m gpu \
  -k "int4 and not decode_variants" > $H/tests.log 2>&1
echo "tests rc=$? at $((SECONDS-T0)) s"; tail -1 $H/tests.log; grep -E "^FAILED|^E " $H/tests.log | head -8 | cut -c1-300
A="--fence --split --rounds 5 --token-order rank-desc"
timeout 70 python3 benchmarks/bench_lora_decode.py --adapter-dtype int8 --out $H/alone8 $A > $H/alone8.log 2>&1
echo "alone int8 rc=$? at $((SECONDS-T0)) s"; grep -E "^\| |failed|rror" $H/alone8.log | cut -c1-150
timeout 170 python3 benchmarks/bench_lora_decode.py --adapter-dtype int4 --variants $R/variants-1-alone.json --out $H/alone4 $A \
  > $H/alone4.log 2>&1; echo "alone int4 rc=$? at $((SECONDS-T0)) s"; grep -E "^\| |failed|rror" $H/alone4.log | cut -c1-150
tar czf $OUT/c1.tgz -C /tmp c1
E="--shape llama7b --batches 256 --adapters 256 --no-eager --steps 20 --rounds 3 --context 256 --pool-gb 54"
for dt in int4 int8; do
  LEFT=$((585 - SECONDS + T0)); [ $LEFT -lt 60 ] && break
  timeout $LEFT python3 benchmarks/bench_engine.py $E --adapter-dtype $dt --out $H/engine-$dt > $H/engine-$dt.log 2>&1
  echo "engine $dt rc=$? at $((SECONDS-T0)) s"; grep -A3 "^ms per step\|^device ms" $H/engine-$dt.log | grep -v "^--"
done
tar czf $OUT/c1.tgz -C /tmp c1
