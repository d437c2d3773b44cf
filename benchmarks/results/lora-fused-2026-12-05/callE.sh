# device call E (2026-12-05): Nsight Compute counters of the fused decode LoRA (one layer of the 256 x 256 int4
# step, tokens by rank: q/k/v and o, one fused launch each, and the plan kernel); what limits o is the question
set -u; export PYTHONUNBUFFERED=1; T0=$SECONDS; H=/tmp/cE; mkdir -p $H
export PYTHONPATH=$PWD
{ cat .commit 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; ncu --version | tail -1; } | tee $H/machine.txt
timeout 130 ncu --profile-from-start off --clock-control none --section SpeedOfLight --section Occupancy \
  --section WarpStateStats --section MemoryWorkloadAnalysis --section LaunchStats --section SchedulerStats \
  --import-source no -o $H/lora python3 benchmarks/ncu_lora_decode.py --adapter-dtype int4 --rank-desc > $H/ncu.log 2>&1
echo "ncu rc=$? at $((SECONDS-T0)) s"; tail -3 $H/ncu.log
ncu -i $H/lora.ncu-rep --page details --print-units base > $H/details.txt 2>&1
grep -E "^  [_a-z]|Duration|DRAM Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Warp Cycles Per Issued|Issue Slots Busy|Stall|L2 Hit|Eligible Warps|No Eligible|Grid Size|Waves" $H/details.txt | head -90 | cut -c1-150
tar czf $OUT/cE.tgz -C /tmp cE
