# device call F (2026-12-03, seventeenth session): the compact expand (items of about one size: pairs
# of rank <= 8 take 4 column tiles an item, rank <= 16 two) on top of the compact shrink, alternated:
# the decode LoRA alone (256 x 256, int8 rows, fenced), the decode-variant and compact GPU kernel
# tests, then the engine's 256 x 256 step (Llama-7B, int8 rows)
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/f; mkdir -p $H; R=benchmarks/results/lora-persist-2026-12-03-h200
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
timeout 100 python3 benchmarks/bench_lora_decode.py --variants $R/variants-F.json --out $H/fence --fence --split --rounds 7 \
  > $H/fence.log 2>&1; echo "fence rc=$? at $((SECONDS-T0)) s"; grep -E "^\| |failed" $H/fence.log | cut -c1-200
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "decode_variants or compact" > $H/tests.log 2>&1
echo "tests rc=$? at $((SECONDS-T0)) s"; tail -2 $H/tests.log; grep -E "^FAILED|Error" $H/tests.log | head -5 | cut -c1-300
timeout 200 python3 benchmarks/engine_tune_sweep.py --variants $R/variants-F.json --out $H/sweep --timeout 70 --warmup -- \
  --shape llama7b --batches 256 --adapters 256 --no-eager --steps 20 --rounds 3 --context 256 --pool-gb 54 \
  --adapter-dtype int8 --profile 2 > $H/sweep.log 2>&1; echo "sweep rc=$? at $((SECONDS-T0)) s"; tail -7 $H/sweep.log | cut -c1-300
grep -h "_plan_kernel\|_shrink_decode_kernel\|_expand_item_kernel\|_expand_decode_kernel" $H/sweep/*/profile-*-lora.txt | cut -c1-60,150-175
tar czf $OUT/f.tgz -C /tmp f
