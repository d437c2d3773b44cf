# device call 1 (2026-12-04): the int8 decode expand with rows as biased fp32 summed per thread (TUNE key BIAS)
# through the GPU kernel tests; the decode LoRA alone with and without it (rows sorted by rank, as the engine
# runs them); the segment shrink's rank tile (shrink_seg BLOCK_N 32 / 64 vs the padded max rank) on prefill cases
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/c1; mkdir -p $H; R=benchmarks/results/lora-bias-2026-12-04-h200
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -x -k "(gpu_decode_variants and biased) or int8_decode" > $H/tests-kernels.log 2>&1
echo "kernel tests rc=$? at $((SECONDS-T0)) s"; tail -1 $H/tests-kernels.log; grep -E "^FAILED|^E " $H/tests-kernels.log | head -6 | cut -c1-300
timeout 150 python3 benchmarks/bench_lora_decode.py --variants $R/variants-1-alone.json --out $H/alone --fence --split --rounds 5 \
  --token-order rank-desc > $H/alone.log 2>&1; echo "alone rc=$? at $((SECONDS-T0)) s"; grep -E "^\| |failed|rror" $H/alone.log | cut -c1-170
CASES=8:1:64,64:1:64,512:1:64,512:8:0,1024:4:0,4096:1:64,4096:64:0
for k in d1 n32-1 n64-1 d2 n32-2 n64-2; do
  case $k in d*) T=;; n32*) T=$R/tune-seg-n32.json;; n64*) T=$R/tune-seg-n64.json;; esac
  LORASERVE_KERNEL_TUNE=$T timeout 60 python3 benchmarks/bench_kernels.py --only prefill_lora --adapters 64 --prefill-cases $CASES \
     --out $H/prefill-$k > $H/prefill-$k.log 2>&1; echo "prefill $k rc=$? at $((SECONDS-T0)) s"
  grep -E "^\| [0-9]" $H/prefill-$k.log | awk -F'|' '{print $2,$3,$4,$11,$12,$13}'
done
tar czf $OUT/c1.tgz -C /tmp c1
