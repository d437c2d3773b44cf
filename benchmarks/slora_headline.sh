#!/usr/bin/env bash
# S-LoRA's headline experiment (arXiv 2311.03285, Table 3 / Fig. 5) through the real services:
# a random-weight Llama-7B checkpoint (no download), `loraserve store` as its own process (a
# private redis-server, blobs on disk, synthetic adapters generated on fetch), `loraserve serve`
# fetching adapters through the store into its host cache and GPU pool, and `loraserve bench`
# driving S-LoRA's workload over gRPC. Writes one JSON per setting and n, table.md (rows and the
# issue's target ratios, by benchmarks/headline_table.py) and a plot per setting under $RESULTS.
#
#   RATE=12 DURATION=60 NS=5,100,1000,2000 bash benchmarks/slora_headline.sh
#   WARM=1 ...   adapters in the host cache before the measured window, as in S-LoRA's runs
#
# Settings: S1 = all adapters rank 8; S2 = ranks 64/32/16/8 evenly (q,k,v,o); GQA = Llama-3-8B's
# shape (8 KV heads) with ranks 64/32/16/8 on attention and MLP (q,k,v,o,gate,up,down):
#   PRESET=llama-3-8b SETTINGS=GQA bash benchmarks/slora_headline.sh
# PEFT and base-only run on the same workload (PEFT only at small n: S-LoRA's schedule, batches of up to
# PEFT_BATCH requests of one adapter, default 6 as in S-LoRA's main runs).
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${PRESET:-llama-7b}
MODEL=${MODEL:-/tmp/loraserve-$PRESET}
RESULTS=${RESULTS:-benchmarks/results/headline}
RATE=${RATE:-12}; DURATION=${DURATION:-60}; NS=${NS:-5,100,1000,2000}; S1_NS=${S1_NS-5,2000}; GQA_NS=${GQA_NS-5,100,1000}
PEFT_NS=${PEFT_NS-5,100}; PEFT_DURATION=${PEFT_DURATION:-30}
SETTINGS=${SETTINGS-S2,S1}   # empty: none
INPUT=${INPUT:-8,512}; OUTPUT=${OUTPUT:-8,512}; DRAIN=${DRAIN:-60}
# the PEFT baseline loads a second copy of the model on the same GPU while the engine holds its
# pool: leave it room only when it runs
GPU_UTIL=${GPU_UTIL:-$([ -n "$PEFT_NS" ] && echo 0.70 || echo 0.90)}; HOST_CACHE_MB=${HOST_CACHE_MB:-60000}; FETCH_PROCESSES=${FETCH_PROCESSES:-8}
WARM=${WARM:-}   # 1: load every adapter into the host cache before measuring (S-LoRA's setup)
PREWARM=${PREWARM-1}   # empty: no discarded pre-warm run per setting
REPEAT=${REPEAT:-1}    # rounds of runs (base-only and each n); the table's ratios use their means
EXTRA_SERVE=${EXTRA_SERVE:-}
STORE_WORKERS=${STORE_WORKERS:-1}   # the store's serving processes (loraserve store --workers)
mkdir -p "$RESULTS"
DATA=$(mktemp -d)
SP=${STORE_PORT:-50052}; EP=${ENGINE_PORT:-50051}
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

[ -f "$MODEL/config.json" ] || { log "building $PRESET with random weights"; python3 benchmarks/examples/make_random_llama.py --preset "$PRESET" --out "$MODEL" --dtype float16; }
NAME=$(basename "$MODEL")

RP=$(python3 -c "from adapter_store.services import free_port; print(free_port())")
python3 -c "
import signal; from adapter_store.services import RedisServer
r = RedisServer(port=$RP).start()   # (before the mask: redis-server would inherit it)
sigs = {signal.SIGTERM, signal.SIGINT}; signal.pthread_sigmask(signal.SIG_BLOCK, sigs)   # sigwait needs them blocked
signal.sigwait(sigs); r.close()" &
REDIS=$!
export LORASERVE_REDIS_URL="redis://127.0.0.1:$RP/0"
loraserve store --port "$SP" --data-dir "$DATA/store" --workers "$STORE_WORKERS" > "$RESULTS/store.log" 2>&1 &
STORE=$!
# shellcheck disable=SC2086
loraserve serve --model "$MODEL" --dtype float16 --port "$EP" --store-target "127.0.0.1:$SP" \
  --data-dir "$DATA/engine" --gpu-memory-utilization "$GPU_UTIL" --host-cache-mb "$HOST_CACHE_MB" \
  --fetch-processes "$FETCH_PROCESSES" --log-level info $EXTRA_SERVE > "$RESULTS/engine.log" 2>&1 &
ENGINE=$!
trap 'kill $ENGINE $STORE $REDIS 2>/dev/null; wait 2>/dev/null; rm -rf "$DATA"' EXIT
export LORASERVE_TARGET="127.0.0.1:$EP" LORASERVE_STORE_TARGET="127.0.0.1:$SP"
for _ in $(seq 1 300); do loraserve health >/dev/null 2>&1 && break; kill -0 $ENGINE || { cat "$RESULTS/engine.log"; exit 1; }; sleep 1; done
log "engine up: $(loraserve stats | head -3 | tr '\n' ' ')"

COMMON="--base-model $NAME --alpha 1 --cv 1 --rate $RATE --duration $DURATION --input-range $INPUT --output-range $OUTPUT --drain-timeout $DRAIN --quiet${WARM:+ --warm}"
base_run() {   # base_run REP
  [ -z "${SKIP_BASE:-}" ] || return 0
  log "base-only (run $1 of $REPEAT)"
  out="$RESULTS/base.json"; [ "$1" = 1 ] || out="$RESULTS/base-r$1.json"
  # shellcheck disable=SC2086
  loraserve bench $COMMON --base-only --n 1 --out "$out" | tee -a "$RESULTS/base.txt"
}
if [ -n "${BASE_FIRST:-}" ] && [ -n "$PREWARM" ] && [ -z "${SKIP_BASE:-}" ]; then
  log "base: pre-warm (discarded), 40 requests"
  # shellcheck disable=SC2086
  loraserve bench $COMMON --base-only --n 1 --max-requests 40 --out "$RESULTS/prewarm-base.json" > /dev/null
fi
# Repeats run in rounds (base, then every setting's n, then again), not each n k times in a row:
# the ratios compare runs that sit side by side, so slow drift of the machine averages out.
# A later round finds an earlier one's adapters in the host cache (when it holds them all), so
# its warm-up is short.
for rep in $(seq 1 "$REPEAT"); do
  [ -z "${BASE_FIRST:-}" ] || base_run "$rep"
  for S in ${SETTINGS//,/ }; do
    [ -n "$S" ] || continue
    TARGETS=q_proj,k_proj,v_proj,o_proj
    case $S in
      S1) RANKS=8; N=$S1_NS ;;
      S2) RANKS=64,32,16,8; N=$NS ;;
      GQA) RANKS=64,32,16,8; N=$GQA_NS; TARGETS=$TARGETS,gate_proj,up_proj,down_proj
           [ "$PRESET" = llama-3-8b ] || { log "GQA runs on PRESET=llama-3-8b"; exit 2; } ;;
      *) log "unknown setting $S (S1, S2, GQA)"; exit 2 ;;
    esac
    if [ -n "$PREWARM" ] && [ "$rep" = 1 ]; then
      # not measured: the first requests of a setting compile whatever Triton variants the server's
      # start-up warm-up did not reach; this keeps those compiles out of the measured runs
      log "$S: pre-warm (discarded), 40 requests at n=5"
      # shellcheck disable=SC2086
      loraserve bench $COMMON --synthetic --ranks $RANKS --targets $TARGETS --n 5 --max-requests 40 \
        --out "$RESULTS/prewarm-$S.json" > /dev/null
    fi
    for n in ${N//,/ }; do   # one file per n and repeat: a run cut short keeps the ones before it
      log "$S: n=$n (run $rep of $REPEAT)"
      out="$RESULTS/$S-n$n.json"; [ "$rep" = 1 ] || out="$RESULTS/$S-n$n-r$rep.json"
      # shellcheck disable=SC2086
      loraserve bench $COMMON --synthetic --ranks $RANKS --targets $TARGETS --n "$n" --out "$out" \
        | tee -a "$RESULTS/$S.txt"
    done
  done
  [ -n "${BASE_FIRST:-}" ] || base_run "$rep"
done
log "engine stats: $(loraserve stats | head -12 | cut -c1-200 | tr '\n' ' ')"
if [ -n "$PEFT_NS" ]; then
  log "PEFT baseline: n=$PEFT_NS"
  # shellcheck disable=SC2086
  loraserve bench --synthetic --base-model $NAME --alpha 1 --cv 1 --rate "${PEFT_RATE:-$RATE}" --duration $PEFT_DURATION --drain-timeout $DRAIN \
    --input-range $INPUT --output-range $OUTPUT --quiet --ranks 64,32,16,8 --n "$PEFT_NS" \
    --compare peft --model "$MODEL" --peft-dtype float16 --peft-batch-size "${PEFT_BATCH:-6}" --out "$RESULTS/peft.json" | tee "$RESULTS/peft.txt"
fi
python3 benchmarks/headline_table.py "$RESULTS" | tee "$RESULTS/table.md"
log done
