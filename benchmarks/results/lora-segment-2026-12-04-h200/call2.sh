# device call 2 (2026-12-04): the split-K segment shrink reduced by its last program (one launch) on the GPU kernel
# tests; prefill LoRA new vs old (48f74ae's kernels/triton_lora.py, carried as .old/) alternated; the decode LoRA
# alone with tokens in adapter order vs sorted by rank
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/c2; mkdir -p $H; R=benchmarks/results/lora-segment-2026-12-04-h200
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -x -k "split or fused or lora_llama7b or mixed_ranks or mixed_step or grouped_llama7b or segment" > $H/tests-kernels.log 2>&1
echo "kernel tests rc=$? at $((SECONDS-T0)) s"; tail -1 $H/tests-kernels.log; grep -E "^FAILED|^E " $H/tests-kernels.log | head -6 | cut -c1-300
rm -rf /tmp/old && mkdir /tmp/old && cp -r benchmarks kernels server /tmp/old/ && cp .old/triton_lora.py /tmp/old/kernels/triton_lora.py
CASES=8:1:64,64:1:64,512:1:64,512:8:0,1024:4:0,4096:1:64,4096:64:0
for k in new1 old1 new2 old2; do
  case $k in new*) D=$PWD;; old*) D=/tmp/old;; esac
  (cd $D && PYTHONPATH=$D timeout 100 python3 benchmarks/bench_kernels.py --only prefill_lora --adapters 64 --prefill-cases $CASES \
     --out $H/prefill-$k > $H/prefill-$k.log 2>&1); echo "prefill $k rc=$? at $((SECONDS-T0)) s"
  grep -E "^prefill_lora" $H/prefill-$k.log | cut -c1-200
done
for o in cycle rank-desc rank-asc; do
  timeout 80 python3 benchmarks/bench_lora_decode.py --out $H/order-$o --fence --split --rounds 3 --token-order $o > $H/order-$o.log 2>&1
  echo "order $o rc=$? at $((SECONDS-T0)) s"; grep -E "^\| committed" $H/order-$o.log | cut -c1-150
done
tar czf $OUT/c2.tgz -C /tmp c2
