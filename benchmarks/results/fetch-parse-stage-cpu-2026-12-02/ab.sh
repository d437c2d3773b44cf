# old (05f45b1) vs new (working tree), alternating, one store process
for round in 1 2 3 4; do
  for side in old new; do
    dir=/work/main; [ $side = old ] && dir=/tmp/old
    (cd $dir && python3 benchmarks/bench_fetch_throughput.py --n 16 --workers 4 --ranks 64,32,16,8 --processes 2 --store-workers 1 --adapter-dtype int8 --out /tmp/ab-$side-$round.json 2>&1 | tail -1 | sed "s/^/$side r$round: /")
  done
done
