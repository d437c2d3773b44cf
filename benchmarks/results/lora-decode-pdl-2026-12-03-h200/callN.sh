# device call N (2026-12-03): PDL on as the int8 decode default: the engine's 256 x 256 and batch-1
# steps (Llama-7B) against the same kernels without PDL, the GPU tests (the decode kernels at Llama
# shapes, the engine end to end against transformers + peft with the int8 tiles), the GQA shape
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/h; mkdir -p $H; R=benchmarks/results/lora-decode-pdl-2026-12-03-h200
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
timeout 170 python3 benchmarks/engine_tune_sweep.py --variants $R/variants-N.json --out $H/sweep --timeout 80 -- \
  --shape llama7b --batches 256,1 --adapters 256 --no-eager --steps 20 --rounds 3 --context 256 --pool-gb 54 \
  --adapter-dtype int8 --profile 2 > $H/sweep.log 2>&1; echo "sweep rc=$? at $((SECONDS-T0)) s"; tail -6 $H/sweep.log | cut -c1-300
grep -h "overlapped_ms" $H/sweep/*.log | cut -c1-260
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "lora and (llama7b or decode)" > $H/kernel-tests.log 2>&1
echo "kernel tests rc=$? at $((SECONDS-T0)) s"; tail -2 $H/kernel-tests.log
timeout 190 python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py > $H/gpu-tests.log 2>&1; echo "engine gpu tests rc=$? at $((SECONDS-T0)) s"; tail -3 $H/gpu-tests.log
timeout 110 python3 benchmarks/engine_tune_sweep.py --variants $R/variants-N.json --out $H/gqa --timeout 50 -- \
  --shape llama3-8b --batches 256 --adapters 256 --no-eager --steps 20 --rounds 3 --context 256 --pool-gb 54 \
  --adapter-dtype int8 > $H/gqa.log 2>&1; echo "gqa rc=$? at $((SECONDS-T0)) s"; tail -4 $H/gqa.log | cut -c1-300
tar czf $OUT/n.tgz -C /tmp h
