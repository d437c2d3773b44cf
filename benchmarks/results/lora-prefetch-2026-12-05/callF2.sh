# device call F2 (prepared 2026-12-05, not yet run): int4 prefill kernel timings with the segment kernels by nibble
# plane (I4_SPLIT, each tune-F-*.json) against the defaults, then the GPU kernel test of int4 prefill with it on
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/cF2; mkdir -p $H; R=benchmarks/results/lora-prefetch-2026-12-05
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; } | tee $H/machine.txt
for v in base i4split i4split-shrink i4split-expand i4split-m128 i4split-n128 base2; do
  LEFT=$((450 - SECONDS + T0)); [ $LEFT -lt 30 ] && break
  if [ ${v#base} != $v ]; then unset LORASERVE_KERNEL_TUNE; else export LORASERVE_KERNEL_TUNE=$R/tune-F-$v.json; fi
  timeout $LEFT python3 benchmarks/bench_kernels.py --adapter-dtype int4 --only prefill_lora --out $H/prefill-$v \
    > $H/prefill-$v.log 2>&1; echo "prefill $v rc=$? at $((SECONDS-T0)) s"; grep -E "^prefill_lora|rror" $H/prefill-$v.log | cut -c1-200
  tar czf $OUT/cF2.tgz -C /tmp cF2
done
LEFT=$((585 - SECONDS + T0)); [ $LEFT -lt 30 ] && exit 0
LORASERVE_KERNEL_TUNE=$R/tune-F-i4split.json timeout $LEFT python3 -m pytest -q -p no:cacheprovider \
  tests/test_kernels.py -k "gpu_lora_llama7b and rows-int4-False" > $H/tests-i4split.log 2>&1
echo "tests i4split rc=$? at $((SECONDS-T0)) s"; tail -1 $H/tests-i4split.log
tar czf $OUT/cF2.tgz -C /tmp cF2
