# device call F (prepared 2026-12-05, not yet run: no device was lent): the fused decode kernel with bulk L2
# prefetches of its rows (PREFETCH 1: A, 3: A and B^T) and with 8 one-row tiles in its expand (G8)
# against the defaults, the decode LoRA alone (int4, int8); then the int4 segment kernels by nibble plane (I4_SPLIT)
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/cF; mkdir -p $H; R=benchmarks/results/lora-prefetch-2026-12-05
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; } | tee $H/machine.txt
A="--fence --rounds 3 --token-order rank-desc"
for dt in int4 int8; do
  timeout 150 python3 benchmarks/bench_lora_decode.py --adapter-dtype $dt --variants $R/variants-F-$dt.json --out $H/alone-$dt $A \
    > $H/alone-$dt.log 2>&1; echo "alone $dt rc=$? at $((SECONDS-T0)) s"; grep -E "^\| |failed|rror" $H/alone-$dt.log | cut -c1-150
  tar czf $OUT/cF.tgz -C /tmp cF
done
for v in base i4split i4split-shrink i4split-expand i4split-m128 i4split-n128; do
  LEFT=$((420 - SECONDS + T0)); [ $LEFT -lt 30 ] && break
  if [ $v = base ]; then unset LORASERVE_KERNEL_TUNE; else export LORASERVE_KERNEL_TUNE=$R/tune-F-$v.json; fi
  timeout $LEFT python3 benchmarks/bench_kernels.py --adapter-dtype int4 --only prefill_lora --out $H/prefill-$v \
    > $H/prefill-$v.log 2>&1; echo "prefill $v rc=$? at $((SECONDS-T0)) s"; grep -E "^prefill_lora|rror" $H/prefill-$v.log | cut -c1-200
  tar czf $OUT/cF.tgz -C /tmp cF
done
unset LORASERVE_KERNEL_TUNE
# the GPU kernel tests of int4 prefill with I4_SPLIT on, and of the fused decode with PREFETCH 3 and G8
LORASERVE_KERNEL_TUNE=$R/tune-F-i4split.json timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py \
  -k "gpu_lora_llama7b and rows-int4-False" > $H/tests-i4split.log 2>&1; echo "tests i4split rc=$?"; tail -1 $H/tests-i4split.log
echo '{"lora": {"fused_decode_int4": {"PREFETCH": 3, "G8": true}, "fused_decode_int8": {"PREFETCH": 3, "G8": true}}}' > $H/tune-pf.json
LORASERVE_KERNEL_TUNE=$H/tune-pf.json timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py \
  -k "gpu_fused_decode" > $H/tests-pf.log 2>&1; echo "tests pf rc=$? at $((SECONDS-T0)) s"; tail -1 $H/tests-pf.log
tar czf $OUT/cF.tgz -C /tmp cF
