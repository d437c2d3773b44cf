#!/bin/sh
# Register example adapters and run one generation through the compose deployment.
#   docker compose --profile example run --rm example-register
# Every PEFT folder under $ADAPTERS_DIR (default /adapters) is registered under its folder name;
# when there is none, a synthetic rank-16 adapter "example-synthetic" is registered instead.
set -eu

ENGINE="${LORASERVE_TARGET:-engine:50051}"
STORE="${LORASERVE_STORE_TARGET:-adapter-store:50052}"
ADAPTERS_DIR="${ADAPTERS_DIR:-/adapters}"
L="loraserve --target $ENGINE --store-target $STORE"

wait_healthy() {
    i=0
    until loraserve --target "$1" --timeout 3 health >/dev/null 2>&1; do
        i=$((i + 1))
        if [ "$i" -gt 120 ]; then echo "error: UNAVAILABLE: $1 is not healthy" >&2; exit 1; fi
        sleep 5
    done
}
wait_healthy "$STORE"
wait_healthy "$ENGINE"

first=""
for dir in "$ADAPTERS_DIR"/*/; do
    [ -f "${dir}adapter_config.json" ] || continue
    name="$(basename "$dir")"
    $L register "$dir" --id "$name" --replace --no-progress
    [ -n "$first" ] || first="$name"
done
if [ -z "$first" ]; then
    first="example-synthetic"
    $L register --id "$first" --synthetic-rank 16 --synthetic-targets q_proj,k_proj,v_proj,o_proj --replace
fi

$L list
$L get "$first"
$L generate --adapter "$first" --max-new-tokens 32 "Write a haiku about GPUs."
$L stats
