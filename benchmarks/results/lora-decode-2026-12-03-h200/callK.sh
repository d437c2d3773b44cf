# device call K (2026-12-03): each group's shrink and expand timed alone (--split), and shrink
# tiles that read a row in one or two loads (no loop) instead of a pipelined loop
set -u; export PYTHONUNBUFFERED=1; H=/tmp/h; mkdir -p $H; export PYTHONPATH=$PWD
{ cat .commit; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader; } | tee $H/machine.txt
timeout 150 python3 benchmarks/bench_lora_decode.py --split --variants benchmarks/results/lora-decode-2026-12-03-h200/variants-K.json \
  --out $H/tiles > $H/tiles.log 2>&1; echo "rc=$?"; grep "^| " $H/tiles.log | cut -c1-160
cp -r $H/tiles $H/tiles.log $H/machine.txt $OUT/
