#!/bin/sh
# S-LoRA's synthetic experiments (arXiv 2311.03285, Section 7 and benchmarks/exp_suite.py) with
# `loraserve bench`, against a running server:
#
#   loraserve serve --model /models/llama-7b &            # or: docker compose up -d
#   sh benchmarks/examples/slora_suite.sh num-adapters     # one suite, or "all"
#
# Results go to $OUTDIR (default benchmarks/results), one JSON per run (slora-alpha-0.1.json, ...);
# `--n` sweeps also plot.
# Environment: LORASERVE_TARGET (default localhost:50051), DURATION (default 300 s as in the
# paper; use 60 for a quick look), RATE (S-LoRA's A100-80GB S2 suite uses 10 req/s), and
# COMPARE (e.g. "peft,base": also run the PEFT baseline in this process, needs MODEL=DIR).
set -eu

SUITE="${1:-num-adapters}"
DURATION="${DURATION:-300}"
RATE="${RATE:-2}"
OUTDIR="${OUTDIR:-benchmarks/results}"
COMMON="--synthetic --ranks 64,32,16,8 --input-range 8,512 --output-range 8,512 --duration $DURATION"
EXTRA=""
if [ -n "${COMPARE:-}" ]; then EXTRA="--compare $COMPARE ${MODEL:+--model $MODEL}"; fi
mkdir -p "$OUTDIR"

run() {  # name, extra args
    name="$1"; shift
    echo "== $name" >&2
    # shellcheck disable=SC2086
    loraserve bench $COMMON "$@" $EXTRA --out "$OUTDIR/slora-$name.json" --plot "$OUTDIR/slora-$name.png"
}

case "$SUITE" in
  num-adapters|all)   # throughput / latency vs number of adapters (S-LoRA Fig. 5, Table 3)
    run num-adapters --n 1,20,50,100,200 --alpha 1 --rate "$RATE" --cv 1 ;;
esac
case "$SUITE" in
  alpha|all)          # adapter popularity skew: smaller alpha = a few hot adapters
    for a in 0.1 0.3 0.6 1; do run "alpha-$a" --n 200 --alpha "$a" --rate "$RATE" --cv 1; done ;;
esac
case "$SUITE" in
  cv|all)             # burstiness of arrivals
    for cv in 1 2 4 6 8; do run "cv-$cv" --n 200 --alpha 1 --rate "$RATE" --cv "$cv"; done ;;
esac
case "$SUITE" in
  rate|all)           # load: requests per second
    for r in 1 1.5 2 2.5; do run "rate-$r" --n 200 --alpha 1 --rate "$r" --cv 1; done ;;
esac
case "$SUITE" in
  num-adapters|alpha|cv|rate|all) ;;
  *) echo "error: INVALID_ARGUMENT: unknown suite $SUITE (num-adapters, alpha, cv, rate, all)" >&2; exit 2 ;;
esac
