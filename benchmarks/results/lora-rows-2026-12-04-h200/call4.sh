# device call 4 (2026-12-04): where the serving loop's step goes. bench_engine.py 256 x 256 (int8 rows, CUDA-graph
# decode) twice, now reporting each step's device time between CUDA events both one step at a time and
# overlapped (step N+1 launched before N's tokens are read), with the SM clock, power and throttle reasons
# sampled every 100 ms beside it
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/c4; mkdir -p $H
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; } | tee $H/machine.txt
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
  --format=csv -lms 100 > $H/smi.csv 2>&1 &
SMI=$!
for k in 1 2; do
  timeout 150 python3 benchmarks/bench_engine.py --shape llama7b --batches 256 --adapters 256 --no-eager --steps 20 --rounds 3 \
    --context 256 --pool-gb 54 --adapter-dtype int8 --out $H/engine-$k > $H/engine-$k.log 2>&1
  echo "engine $k rc=$? at $((SECONDS-T0)) s"; grep -A3 "^ms per step\|^device ms" $H/engine-$k.log | grep -v "^--"
done
kill $SMI; wc -l $H/smi.csv; awk -F', ' 'NR>1 {print $2, $6}' $H/smi.csv | sort | uniq -c | sort -rn | head -12
tar czf $OUT/c4.tgz -C /tmp c4
