# device call M (2026-12-03): per-token flags between the int8 decode shrink and expand (lora_apply,
# decode_sync FLAGS) with PDL, and the shrink's first-tile prefetch (fixed since call L): the GPU
# kernel tests of the new paths, then alone (bench_lora_decode.py, fenced with --split, and not), then
# the engine's 256 x 256 and batch-1 steps (Llama-7B) against the committed kernels
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/h; mkdir -p $H; R=benchmarks/results/lora-decode-pdl-2026-12-03-h200
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "per_token_flags or decode_variants" > $H/kernel-tests.log 2>&1
echo "kernel tests rc=$? at $((SECONDS-T0)) s"; tail -3 $H/kernel-tests.log
timeout 100 python3 benchmarks/bench_lora_decode.py --variants $R/variants-M.json --fence --split --out $H/fence > $H/fence.log 2>&1
echo "fence rc=$? at $((SECONDS-T0)) s"; grep -E "^\| |failed" $H/fence.log | cut -c1-150
timeout 80 python3 benchmarks/bench_lora_decode.py --variants $R/variants-M.json --out $H/nofence > $H/nofence.log 2>&1
echo "nofence rc=$? at $((SECONDS-T0)) s"; grep -E "^\| |failed" $H/nofence.log | cut -c1-110
python3 -c "import json; v=json.load(open('$R/variants-M.json')); json.dump({k: v[k] for k in ('committed', 'flags-pdl', 'flags-pdl-prefetch', 'pdl')}, open('$H/engine-variants.json', 'w'))"
timeout 330 python3 benchmarks/engine_tune_sweep.py --variants $H/engine-variants.json --out $H/sweep --timeout 80 -- \
  --shape llama7b --batches 256,1 --adapters 256 --no-eager --steps 20 --rounds 3 --context 256 --pool-gb 54 \
  --adapter-dtype int8 --profile 2 > $H/sweep.log 2>&1; echo "sweep rc=$? at $((SECONDS-T0)) s"; tail -11 $H/sweep.log | cut -c1-300
for f in $H/sweep/*/profile-*b256-lora.txt; do echo "== $f"; grep -E "_decode_kernel|Self CUDA time total" $f | head -4 | cut -c60-200; done
tar czf $OUT/m.tgz -C /tmp h
