# device call 5 (2026-12-05, twenty-fifth session), the kernels of call 4: the decode LoRA alone at a GQA shape
# (k and v 1024 wide), int8 and int4 at three expand tiles; the engine at batch 1 and 256 with mixed prefill steps
# (4 prompts of 256 tokens beside the batch: the int4 segment kernels), int4 and int8 alternated twice; the
# engine's 256 x 256 step at the Llama-3-8B shape (GQA), int4 and int8
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/c5; mkdir -p $H; R=benchmarks/results/lora-int4-2026-12-05
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
A="--fence --split --rounds 5 --token-order rank-desc --kv-heads 8"
timeout 60 python3 benchmarks/bench_lora_decode.py --adapter-dtype int8 --out $H/gqa8 $A > $H/gqa8.log 2>&1
echo "gqa int8 rc=$? at $((SECONDS-T0)) s"; grep -E "^\| |failed|rror" $H/gqa8.log | cut -c1-150
timeout 90 python3 benchmarks/bench_lora_decode.py --adapter-dtype int4 --variants $R/variants-5-gqa.json --out $H/gqa4 $A \
  > $H/gqa4.log 2>&1; echo "gqa int4 rc=$? at $((SECONDS-T0)) s"; grep -E "^\| |failed|rror" $H/gqa4.log | cut -c1-150
tar czf $OUT/c5.tgz -C /tmp c5
E="--shape llama7b --batches 1,256 --adapters 256 --steps 20 --rounds 3 --context 256 --pool-gb 54 --prefill 4x256"
for k in 1 2; do for dt in int4 int8; do
  LEFT=$((420 - SECONDS + T0)); [ $LEFT -lt 45 ] && break 2
  timeout $LEFT python3 benchmarks/bench_engine.py $E --adapter-dtype $dt --out $H/mixed-$dt-$k > $H/mixed-$dt-$k.log 2>&1
  echo "mixed $dt $k rc=$? at $((SECONDS-T0)) s"; grep -v "^\s*$" $H/mixed-$dt-$k.log | tail -22 | cut -c1-160
done; done
tar czf $OUT/c5.tgz -C /tmp c5
G="--shape llama3-8b --batches 256 --adapters 256 --no-eager --steps 20 --rounds 3 --context 256 --pool-gb 46"
for dt in int4 int8; do
  LEFT=$((570 - SECONDS + T0)); [ $LEFT -lt 40 ] && break
  timeout $LEFT python3 benchmarks/bench_engine.py $G --adapter-dtype $dt --out $H/gqa-engine-$dt > $H/gqa-engine-$dt.log 2>&1
  echo "llama3-8b $dt rc=$? at $((SECONDS-T0)) s"; grep -A2 "^ms per step\|^device ms" $H/gqa-engine-$dt.log | grep "graph"
done
tar czf $OUT/c5.tgz -C /tmp c5
