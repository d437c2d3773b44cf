# device call 6 (2026-12-05): diagnose the illegal memory access of call 5's mixed steps (4 prompts of 256 tokens
# beside a decode batch, bench_engine --prefill 4x256, int8 and int4 rows, pool 54 GB). Synchronous launches name
# the kernel; fp16 rows and a 16 GB pool tell whether the rows' format or the pool's size matters
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/c6; mkdir -p $H
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; } | tee $H/machine.txt
E="--shape llama7b --batches 1 --adapters 256 --no-eager --steps 3 --rounds 1 --context 256 --prefill 4x256"
for run in "int8 54 1" "auto 54 0" "int8 16 0" "int4 16 0" "int8 30 0"; do
  set -- $run
  LEFT=$((300 - SECONDS + T0)); [ $LEFT -lt 30 ] && break
  CUDA_LAUNCH_BLOCKING=$3 timeout $LEFT python3 benchmarks/bench_engine.py $E --adapter-dtype $1 --pool-gb $2 \
    --out $H/m-$1-$2 > $H/m-$1-$2.log 2>&1
  echo "== $1 pool $2 blocking $3: rc=$? at $((SECONDS-T0)) s"
  grep -v "^frame\|^$" $H/m-$1-$2.log | grep -B14 -m1 "Error" | cut -c1-200 | tail -14
  grep -i "prefill" $H/m-$1-$2.log | tail -3 | cut -c1-200
done
tar czf $OUT/c6.tgz -C /tmp c6
