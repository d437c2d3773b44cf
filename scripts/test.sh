#!/usr/bin/env bash
# The test command (README, CI): install with test extras, then the whole pytest suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.13.0   # CPU wheel on disk
python3 -m pip install -q -e '.[test]'
exec python3 -m pytest -q -p no:cacheprovider "$@"
