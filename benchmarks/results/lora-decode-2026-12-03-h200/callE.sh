# device call E (2026-12-03): decode LoRA variants alone (bench_lora_decode.py, int8 rows, then
# fp16 rows), the one-launch schedule's GPU tests, and the engine's 256 x 256 step with the two
# fastest one-launch variants (picked from the first run's table) against the committed kernels
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/h; mkdir -p $H /tmp/site
for w in .whl/*.whl; do python3 -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall('/tmp/site')" $w; done
export PYTHONPATH=/tmp/site:$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader; nproc
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
V=benchmarks/results/lora-decode-2026-12-03-h200
timeout 220 python3 benchmarks/bench_lora_decode.py --variants benchmarks/tune/lora-decode-h200.json --out $H/int8 \
  > $H/int8.log 2>&1; echo "int8 rc=$? at $((SECONDS-T0)) s"; tail -18 $H/int8.log | cut -c1-150
python3 - <<'PY'
import json
r = json.load(open("/tmp/h/int8/lora_decode.json"))["results"]
ones = sorted((v["step_ms"], n) for n, v in r.items() if v.get("ok") and v["spec"].get("mode") == "one" and not v["spec"].get("ordered"))
out = {"committed": {}}
for ms, n in ones[:2]:
    out[n] = {"lora": {"shrink_expand": dict(r[n]["spec"]["lora"]["shrink_expand"], ENABLED=True)}}
print("engine variants:", out)
json.dump(out, open("/tmp/h/engine-variants.json", "w"))
PY
timeout 200 python3 benchmarks/engine_tune_sweep.py --variants $H/engine-variants.json --out $H/sweep --timeout 95 -- \
  --shape llama7b --batches 256 --adapters 256 --no-eager --steps 20 --rounds 3 --context 256 --pool-gb 54 \
  --adapter-dtype int8 --profile 3 > $H/sweep.log 2>&1; echo "sweep rc=$? at $((SECONDS-T0)) s"; tail -6 $H/sweep.log | cut -c1-300
grep -h "overlapped_ms" $H/sweep/*.log | cut -c1-300
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k shrink_expand > $H/gpu-tests.log 2>&1; echo "gpu tests rc=$? at $((SECONDS-T0)) s"; tail -3 $H/gpu-tests.log
timeout $((560-(SECONDS-T0))) python3 benchmarks/bench_lora_decode.py --adapter-dtype auto --rounds 3 \
  --variants benchmarks/tune/lora-decode-fp16.json --out $H/fp16 > $H/fp16.log 2>&1; echo "fp16 rc=$? at $((SECONDS-T0)) s"; tail -8 $H/fp16.log | cut -c1-150
for f in $H/sweep/*/profile-*lora*.txt; do echo "== $f"; grep -E "lora|shrink|expand|Self CUDA time total" $f | head -6 | cut -c1-200; done
tar czf $OUT/e.tgz -C /tmp h
