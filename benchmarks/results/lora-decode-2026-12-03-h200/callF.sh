# device call F (2026-12-03): int8 decode shrink and expand tile variants alone (bench_lora_decode.py),
# the best of each combined, that combination in the engine's 256 x 256 step against the committed
# tiles, and the decode GPU tests under the combination's tiles
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/h; mkdir -p $H
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
timeout 240 python3 benchmarks/bench_lora_decode.py --variants benchmarks/tune/lora-decode-h200-b.json --out $H/tiles \
  > $H/tiles.log 2>&1; echo "tiles rc=$? at $((SECONDS-T0)) s"; grep "^| " $H/tiles.log | cut -c1-110
python3 - <<'PY'
import json
r = json.load(open("/tmp/h/tiles/lora_decode.json"))["results"]
ok = {n: v for n, v in r.items() if v.get("ok")}
two = ok["two"]["step_ms"]
best = {}
for fam in ("s", "e"):
    c = sorted((v["step_ms"], n) for n, v in ok.items() if n.startswith(fam + "-"))
    if c and c[0][0] < two:
        best[fam] = c[0][1]
lora = {}
for n in best.values():
    for f, o in ok[n]["spec"]["lora"].items():
        lora.setdefault(f, {}).update(o)
print("best:", best, "->", lora)
json.dump({"committed": {}, "combined": {"lora": lora}}, open("/tmp/h/engine-variants.json", "w"))
json.dump({"lora": lora}, open("/tmp/h/combined.tune.json", "w"))
json.dump({"two": {"mode": "two"}, "combined": {"mode": "two", "lora": lora}}, open("/tmp/h/combined-bench.json", "w"))
PY
timeout 200 python3 benchmarks/engine_tune_sweep.py --variants $H/engine-variants.json --out $H/sweep --timeout 95 -- \
  --shape llama7b --batches 256 --adapters 256 --no-eager --steps 20 --rounds 3 --context 256 --pool-gb 54 \
  --adapter-dtype int8 --profile 3 > $H/sweep.log 2>&1; echo "sweep rc=$? at $((SECONDS-T0)) s"; tail -5 $H/sweep.log | cut -c1-300
grep -h "overlapped_ms" $H/sweep/*.log | cut -c1-300
LORASERVE_KERNEL_TUNE=$H/combined.tune.json timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py \
  -k "lora and (llama7b or decode) and not shrink_expand" > $H/gpu-tests.log 2>&1; echo "gpu tests rc=$? at $((SECONDS-T0)) s"; tail -3 $H/gpu-tests.log
for f in $H/sweep/*/profile-*lora*.txt; do echo "== $f"; grep -E "lora|shrink|expand|Self CUDA time total" $f | head -6 | cut -c60-200; done
tar czf $OUT/f.tgz -C /tmp h
