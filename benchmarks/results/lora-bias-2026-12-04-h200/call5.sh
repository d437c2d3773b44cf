# device call 5 (2026-12-04): the final kernels (BIAS r32 the int8 expand's default, shrink_seg BLOCK_N 64):
# GPU kernel tests; the engine's 256 x 256 step with the expand before BIAS vs now, three rounds alternated; the
# decode LoRA alone, before vs now; prefill LoRA with the segment shrink's rank tile 64 vs the padded max rank
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/c5; mkdir -p $H; R=benchmarks/results/lora-bias-2026-12-04-h200
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "(gpu_decode_variants and biased) or int8_decode or lora_llama7b or split or segment or mixed" > $H/tests-kernels.log 2>&1
echo "kernel tests rc=$? at $((SECONDS-T0)) s"; tail -1 $H/tests-kernels.log; grep -E "^FAILED|^E " $H/tests-kernels.log | head -6 | cut -c1-300
timeout 150 python3 benchmarks/engine_tune_sweep.py --variants $R/variants-5-engine.json --out $H/sweep --timeout 75 --warmup -- \
  --shape llama7b --batches 256 --adapters 256 --no-eager --steps 20 --rounds 3 --context 256 --pool-gb 54 \
  --adapter-dtype int8 > $H/sweep.log 2>&1; echo "sweep rc=$? at $((SECONDS-T0)) s"; grep -E "^\|" $H/sweep.log | tail -8
timeout 80 python3 benchmarks/bench_lora_decode.py --variants $R/variants-5.json --out $H/alone --fence --split --rounds 5 \
  --token-order rank-desc > $H/alone.log 2>&1; echo "alone rc=$? at $((SECONDS-T0)) s"; grep -E "^\| |failed|rror" $H/alone.log | cut -c1-120
CASES=8:1:64,64:1:64,512:1:64,512:8:0,1024:4:0,4096:1:64,4096:64:0
for k in n64-1 max-1 n64-2 max-2; do
  case $k in n64*) T=;; max*) T=$R/tune-seg-max.json;; esac
  LORASERVE_KERNEL_TUNE=$T timeout 60 python3 benchmarks/bench_kernels.py --only prefill_lora --adapters 64 --prefill-cases $CASES \
     --out $H/prefill-$k > $H/prefill-$k.log 2>&1; echo "prefill $k rc=$? at $((SECONDS-T0)) s"
  grep -E "^\| [0-9]" $H/prefill-$k.log | awk -F'|' '{print $2,$3,$4,$11,$12,$13}'
done
tar czf $OUT/c5.tgz -C /tmp c5
