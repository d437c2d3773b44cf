# device call L (2026-12-03): programmatic dependent launch (PDL) and first-tile prefetch in the
# int8 decode LoRA kernels: alone (bench_lora_decode.py, with and without a fence kernel before each
# group), the shrink tiles prepared in the last session (--split), then the engine's 256 x 256 and
# batch-1 steps (Llama-7B) against the committed kernels
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/h; mkdir -p $H; R=benchmarks/results/lora-decode-pdl-2026-12-03-h200
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
timeout 100 python3 benchmarks/bench_lora_decode.py --variants $R/variants-L.json --fence --split --out $H/fence > $H/fence.log 2>&1
echo "fence rc=$? at $((SECONDS-T0)) s"; grep -E "^\| |failed" $H/fence.log | cut -c1-150
timeout 80 python3 benchmarks/bench_lora_decode.py --variants $R/variants-L.json --out $H/nofence > $H/nofence.log 2>&1
echo "nofence rc=$? at $((SECONDS-T0)) s"; grep -E "^\| |failed" $H/nofence.log | cut -c1-110
timeout 80 python3 benchmarks/bench_lora_decode.py --variants benchmarks/tune/lora-decode-int8-shrink-next.json --split --out $H/shrink > $H/shrink.log 2>&1
echo "shrink rc=$? at $((SECONDS-T0)) s"; grep -E "^\| |failed" $H/shrink.log | cut -c1-150
timeout 300 python3 benchmarks/engine_tune_sweep.py --variants $R/variants-L-engine.json --out $H/sweep --timeout 98 -- \
  --shape llama7b --batches 1,256 --adapters 256 --no-eager --steps 20 --rounds 3 --context 256 --pool-gb 54 \
  --adapter-dtype int8 --profile 2 > $H/sweep.log 2>&1; echo "sweep rc=$? at $((SECONDS-T0)) s"; tail -9 $H/sweep.log | cut -c1-300
grep -h "overlapped_ms" $H/sweep/*.log | cut -c1-300
for f in $H/sweep/*/profile-*b256-lora.txt; do echo "== $f"; grep -E "_decode_kernel|nvjet|Self CUDA time total" $f | head -8 | cut -c60-200; done
tar czf $OUT/l.tgz -C /tmp h
