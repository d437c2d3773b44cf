# device call 9 (2026-12-05): the GPU int4 tests on the final tiles (int4 expand in chunks of 8 rows)
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/c9; mkdir -p $H
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; } | tee $H/machine.txt
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_engine_gpu.py -m gpu \
  -k "int4 and not decode_variants" > $H/tests.log 2>&1
echo "tests rc=$? at $((SECONDS-T0)) s"; tail -1 $H/tests.log; grep -E "^FAILED|^E " $H/tests.log | head -8 | cut -c1-300
tar czf $OUT/c9.tgz -C /tmp c9
