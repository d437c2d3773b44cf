# device call P (2026-12-03, on call N's machine while still warm): PDL and no PDL alternated twice in
# the engine's 256 x 256 step, no-PDL first, to separate the effect from the sweep's order
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/p; mkdir -p $H; R=benchmarks/results/lora-decode-pdl-2026-12-03-h200
export PYTHONPATH=$PWD
timeout 200 python3 benchmarks/engine_tune_sweep.py --variants $R/variants-P.json --out $H/sweep --timeout 60 -- \
  --shape llama7b --batches 256 --adapters 256 --no-eager --steps 20 --rounds 3 --context 256 --pool-gb 54 \
  --adapter-dtype int8 > $H/sweep.log 2>&1; echo "sweep rc=$? at $((SECONDS-T0)) s"; tail -6 $H/sweep.log | cut -c1-300
grep -h "overlapped_ms" $H/sweep/*.log | cut -c1-330
tar czf $OUT/p.tgz -C /tmp p
