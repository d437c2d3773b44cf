# device call 7 (2026-12-05): call 5's mixed steps again with bench_engine reserving KV for them (the decode batch
# had outgrown its blocks: see benchmarks/results/mixed-step-crash-2026-12-05): 4 prompts of 256 tokens beside
# batches of 1 and 256 over 256 adapters, int4 and int8 rows alternated twice (the int4 prefill = segment kernels)
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/c7; mkdir -p $H
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; } | tee $H/machine.txt
E="--shape llama7b --batches 1,256 --adapters 256 --no-eager --steps 20 --rounds 3 --context 256 --pool-gb 54 --prefill 4x256"
for k in 1 2; do for dt in int4 int8; do
  LEFT=$((400 - SECONDS + T0)); [ $LEFT -lt 50 ] && break 2
  timeout $LEFT python3 benchmarks/bench_engine.py $E --adapter-dtype $dt --out $H/mixed-$dt-$k > $H/mixed-$dt-$k.log 2>&1
  echo "mixed $dt $k rc=$? at $((SECONDS-T0)) s"; grep -v "^\s*$" $H/mixed-$dt-$k.log | grep -v "^{" | tail -12 | cut -c1-170
  grep -o '"batch": [0-9]*\|"prefill_[a-z]*": [0-9.-]*' $H/mixed-$dt-$k.log | paste -sd' ' | cut -c1-400
done; done
tar czf $OUT/c7.tgz -C /tmp c7
