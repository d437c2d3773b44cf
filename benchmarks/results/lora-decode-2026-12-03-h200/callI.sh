# device call I (2026-12-03): the decode LoRA on a side stream beside the base GEMM
# (LORASERVE_LORA_SIDE_STREAM=o, =qkv,o) against the committed in-line LoRA, in the engine's
# 256 x 256 and batch-1 steps (Llama-7B, int8 rows), then the engine's GPU tests (the side-stream
# tests against peft among them)
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/h; mkdir -p $H
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
timeout 300 python3 benchmarks/engine_tune_sweep.py --variants benchmarks/results/lora-decode-2026-12-03-h200/variants-I.json --out $H/sweep --timeout 98 -- \
  --shape llama7b --batches 1,256 --adapters 256 --no-eager --steps 20 --rounds 3 --context 256 --pool-gb 54 \
  --adapter-dtype int8 --profile 2 > $H/sweep.log 2>&1; echo "sweep rc=$? at $((SECONDS-T0)) s"; tail -9 $H/sweep.log | cut -c1-300
grep -h "overlapped_ms" $H/sweep/*.log | cut -c1-300
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py > $H/gpu-tests.log 2>&1; echo "gpu tests rc=$? at $((SECONDS-T0)) s"; tail -4 $H/gpu-tests.log
for f in $H/sweep/*/profile-*b256-lora.txt; do echo "== $f"; grep -E "_decode_kernel|nvjet|Self CUDA time total" $f | head -8 | cut -c60-200; done
tar czf $OUT/i.tgz -C /tmp h
