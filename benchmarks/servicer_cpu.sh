#!/usr/bin/env bash
# CPU time per streamed message in the server's main thread (the gRPC event loop that runs the
# servicers), against the engine thread's, with `loraserve serve` (demo model) in its own
# process and benchmarks/bench_grpc.py as the client in another. The main thread and the engine
# thread share the GIL, so this is the budget the engine loses to streaming as streams grow.
#   SERVE_ARGS="--stream-interval 4" bash benchmarks/servicer_cpu.sh [STREAMS] [NEW_TOKENS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
STREAMS=${1:-128}; NEW=${2:-256}; SECONDS_=${3:-10}
P=$(python3 -c "from adapter_store.services import free_port; print(free_port())")
D=$(mktemp -d)
loraserve serve --port "$P" --data-dir "$D" --log-level warning ${SERVE_ARGS:-} > "$D/serve.log" 2>&1 &
S=$!
trap 'kill $S 2>/dev/null; wait $S 2>/dev/null; rm -rf "$D"' EXIT
for _ in $(seq 1 120); do loraserve --target "127.0.0.1:$P" health > /dev/null 2>&1 && break; sleep 0.5; done
snap() { for t in /proc/$S/task/*; do echo "$(basename "$t") $(tr ' ' _ < "$t/comm") $(awk '{print $14 + $15}' "$t/stat")"; done | sort; }
python3 benchmarks/bench_grpc.py --target "127.0.0.1:$P" --concurrency "$STREAMS" --seconds 2 --adapters 0 --new-tokens 16 > /dev/null
snap > "$D/cpu0"
python3 benchmarks/bench_grpc.py --target "127.0.0.1:$P" --concurrency "$STREAMS" --seconds "$SECONDS_" --adapters 0 \
  --new-tokens "$NEW" | grep '^{' | tee "$D/run.json"
snap > "$D/cpu1"
TOKENS=$(python3 -c "import json; print(json.load(open('$D/run.json'))['tokens'])")
TICK=$(getconf CLK_TCK)
join "$D/cpu0" "$D/cpu1" | awk -v pid="$S" -v tok="$TOKENS" -v tick="$TICK" '{
  d = ($5 - $3) / tick; if (d <= 0) next
  name = ($1 == pid) ? "main (event loop)" : $2 " " $1
  printf "%-24s %7.2f s CPU  %6.1f us per streamed token\n", name, d, 1e6 * d / tok }'
