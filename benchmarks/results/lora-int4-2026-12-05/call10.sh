# device call 10 (2026-12-05): the engine on the final tiles (int4 expand in chunks of 8 rows): batch 1 and
# 256 requests over 256 adapters vs the base model, int4 and int8 rows alternated 3 times
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/c10; mkdir -p $H
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; } | tee $H/machine.txt
E="--shape llama7b --batches 1,256 --adapters 256 --no-eager --steps 20 --rounds 3 --context 256 --pool-gb 54"
for k in 1 2 3; do for dt in int4 int8; do
  LEFT=$((330 - SECONDS + T0)); [ $LEFT -lt 40 ] && break 2
  timeout $LEFT python3 benchmarks/bench_engine.py $E --adapter-dtype $dt --out $H/engine-$dt-$k > $H/engine-$dt-$k.log 2>&1
  echo "engine $dt $k rc=$? at $((SECONDS-T0)) s"; grep -A3 "^ms per step\|^device ms" $H/engine-$dt-$k.log | grep "graph"
done; done
tar czf $OUT/c10.tgz -C /tmp c10
