# device call C (2026-12-03, seventeenth session): COMPACT as the int8 decode shrink's default: the
# GPU kernel tests (Llama-7B and GQA shapes, every decode variant), the engine's GPU tests (end to
# end against transformers + peft, int8 decode tiles forced at small batches), then the GQA shape's
# 256 x 256 step (Llama-3-8B shapes, int8 rows) with and without it, alternated
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/c; mkdir -p $H; R=benchmarks/results/lora-persist-2026-12-03-h200
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
timeout 130 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "lora and (llama7b or decode or compact)" > $H/kernel-tests.log 2>&1
echo "kernel tests rc=$? at $((SECONDS-T0)) s"; tail -2 $H/kernel-tests.log; grep -E "^FAILED" $H/kernel-tests.log | head -5
timeout 190 python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py > $H/gpu-tests.log 2>&1; echo "engine gpu tests rc=$? at $((SECONDS-T0)) s"; tail -3 $H/gpu-tests.log
timeout 250 python3 benchmarks/engine_tune_sweep.py --variants $R/variants-C.json --out $H/gqa --timeout 55 --warmup -- \
  --shape llama3-8b --batches 256 --adapters 256 --no-eager --steps 20 --rounds 3 --context 256 --pool-gb 54 \
  --adapter-dtype int8 > $H/gqa.log 2>&1; echo "gqa rc=$? at $((SECONDS-T0)) s"; tail -7 $H/gqa.log | cut -c1-300
tar czf $OUT/c.tgz -C /tmp c
