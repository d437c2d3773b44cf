# device call 4 (2026-12-04): the final commit through the GPU engine tests (PEFT parity, fp16 and int8 rows, prefill
# with the one-launch split-K shrink) and the GPU LoRA kernel tests
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/c4; mkdir -p $H
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py > $H/tests-engine.log 2>&1
echo "engine tests rc=$? at $((SECONDS-T0)) s"; tail -1 $H/tests-engine.log; grep -E "^FAILED|^E " $H/tests-engine.log | head -6 | cut -c1-300
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "split or fused or lora_llama7b or mixed or grouped_llama7b or int8" > $H/tests-kernels.log 2>&1
echo "kernel tests rc=$? at $((SECONDS-T0)) s"; tail -1 $H/tests-kernels.log; grep -E "^FAILED|^E " $H/tests-kernels.log | head -6 | cut -c1-300
tar czf $OUT/c4.tgz -C /tmp c4
