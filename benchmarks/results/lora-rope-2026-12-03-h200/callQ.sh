# device call Q (2026-12-03): the q/k/v LoRA expand fused with rope_write_kv (one kernel where
# decode steps ran two): its GPU kernel tests at Llama-7B and GQA shapes, then the engine's
# 256 x 256 step (Llama-7B, int8 rows) with the fused kernel and with the two kernels, alternated twice
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/q; mkdir -p $H; R=benchmarks/results/lora-rope-2026-12-03-h200
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "rope_write_kv or (lora and decode)" > $H/kernel-tests.log 2>&1
echo "kernel tests rc=$? at $((SECONDS-T0)) s"; tail -2 $H/kernel-tests.log; grep -E "^FAILED|Error" $H/kernel-tests.log | head -5 | cut -c1-300
timeout 330 python3 benchmarks/engine_tune_sweep.py --variants $R/variants-Q.json --out $H/sweep --timeout 70 --warmup -- \
  --shape llama7b --batches 256 --adapters 256 --no-eager --steps 20 --rounds 3 --context 256 --pool-gb 54 \
  --adapter-dtype int8 --profile 2 > $H/sweep.log 2>&1; echo "sweep rc=$? at $((SECONDS-T0)) s"; tail -8 $H/sweep.log | cut -c1-300
grep -h "overlapped_ms" $H/sweep/*.log | cut -c1-330
tar czf $OUT/q.tgz -C /tmp q
