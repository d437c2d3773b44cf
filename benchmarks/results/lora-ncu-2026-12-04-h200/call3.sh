# device call 3 (2026-12-04, nineteenth session): Nsight Compute counters of the decode LoRA kernels (one layer of the
# 256 x 256 int8 step: q/k/v shrink + expand, o shrink + expand, the plan kernel), full section set
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/c3; mkdir -p $H
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch,triton; print(torch.__version__, triton.__version__)"; which ncu; ncu --version | tail -1; } | tee $H/machine.txt
timeout 420 ncu --profile-from-start off --clock-control none --set full --import-source no -o $H/lora \
  python3 benchmarks/ncu_lora_decode.py > $H/ncu.log 2>&1; echo "ncu rc=$? at $((SECONDS-T0)) s"; tail -5 $H/ncu.log
ncu -i $H/lora.ncu-rep --page details --print-units base > $H/details.txt 2>&1
ncu -i $H/lora.ncu-rep --page raw --csv > $H/raw.csv 2>&1
grep -E "^  [_a-z]|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Block Limit|Warp Cycles Per Issued|Issue Slots Busy|Stall|L2 Hit|Eligible Warps|No Eligible" $H/details.txt | head -150 | cut -c1-160
tar czf $OUT/c3.tgz -C /tmp c3
