# device call G (2026-12-03): the new int8 decode tiles as committed defaults: alone against the
# previous tiles (bench_lora_decode.py), in the engine's 256 x 256 step against the previous tiles
# (Llama-7B) and on the GQA shape (Llama-3-8B), then the engine's GPU tests
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/h; mkdir -p $H
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
timeout 120 python3 benchmarks/bench_lora_decode.py --variants benchmarks/tune/lora-decode-int8-tiles.json --out $H/tiles \
  > $H/tiles.log 2>&1; echo "tiles rc=$? at $((SECONDS-T0)) s"; grep "^| " $H/tiles.log | cut -c1-110
python3 -c "import json; v=json.load(open('benchmarks/tune/lora-decode-int8-tiles.json')); json.dump({k: v[k] for k in ('committed', 'previous-int8-tiles')}, open('$H/engine-variants.json', 'w'))"
timeout 200 python3 benchmarks/engine_tune_sweep.py --variants $H/engine-variants.json --out $H/sweep --timeout 95 -- \
  --shape llama7b --batches 256 --adapters 256 --no-eager --steps 20 --rounds 3 --context 256 --pool-gb 54 \
  --adapter-dtype int8 --profile 3 > $H/sweep.log 2>&1; echo "sweep rc=$? at $((SECONDS-T0)) s"; tail -4 $H/sweep.log | cut -c1-300
grep -h "overlapped_ms" $H/sweep/*.log | cut -c1-300
echo '{"committed": {}}' > $H/gqa-variants.json
timeout 110 python3 benchmarks/engine_tune_sweep.py --variants $H/gqa-variants.json --out $H/gqa --timeout 100 -- \
  --shape llama3-8b --batches 256 --adapters 256 --no-eager --steps 20 --rounds 3 --context 256 --pool-gb 54 \
  --adapter-dtype int8 --profile 3 > $H/gqa.log 2>&1; echo "gqa rc=$? at $((SECONDS-T0)) s"; tail -3 $H/gqa.log | cut -c1-300
grep -h "overlapped_ms" $H/gqa/*.log | cut -c1-300
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py > $H/gpu-tests.log 2>&1; echo "gpu tests rc=$? at $((SECONDS-T0)) s"; tail -3 $H/gpu-tests.log
for f in $H/sweep/*/profile-*lora*.txt $H/gqa/*/profile-*lora*.txt; do echo "== $f"; grep -E "lora|shrink|expand|attention|Self CUDA time total" $f | head -6 | cut -c60-200; done
tar czf $OUT/g.tgz -C /tmp h
