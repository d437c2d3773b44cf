#!/usr/bin/env bash
# The main job on a fresh machine: install, `loraserve serve` on its embedded defaults (demo model,
# private redis-server, blobs under a data dir), then one streamed generation through the client.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.13.0   # CPU wheel on disk
python3 -m pip install -q -e .
PORT=${LORASERVE_PORT:-50051}
DATA=$(mktemp -d)
echo "== starting loraserve serve on 127.0.0.1:$PORT (demo model with random weights, private redis-server, data in $DATA)"
loraserve serve --port "$PORT" --data-dir "$DATA" &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$DATA"' EXIT
healthy=""
for _ in $(seq 1 120); do
  if python3 - "$PORT" <<'PY' 2>/dev/null; then healthy=1; break; fi
import sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
with grpc.insecure_channel(f"127.0.0.1:{sys.argv[1]}") as ch:
    health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
PY
  kill -0 $PID 2>/dev/null || { echo "error: loraserve serve exited before it was healthy (its log is above)" >&2; exit 1; }
  sleep 1
done
[ -n "$healthy" ] || { echo "error: loraserve serve was not healthy after 120 s on port $PORT" >&2; exit 1; }
echo "== loraserve generate (the demo model's weights are random: expect noise, not prose)"
loraserve --target "127.0.0.1:$PORT" generate "Hello from loraserve:" --max-new-tokens 32
echo "== loraserve stats"
loraserve --target "127.0.0.1:$PORT" stats
