"""The decode LoRA kernels of one layer of the 256 x 256 step, for Nsight Compute's counters.

bench_lora_decode.py times the kernels; this script only runs them, between cudaProfilerStart and
cudaProfilerStop, so ``ncu --profile-from-start off`` reads the hardware counters (occupancy, warp
stall reasons, DRAM and L2 throughput) of exactly one layer's launches, as the model makes them
(lora_apply: q/k/v and o, each one fused launch with quantized rows, else shrink and expand) and the
plan kernel, after a warm-up that compiles them.

    ncu --profile-from-start off --clock-control none --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats --section MemoryWorkloadAnalysis python benchmarks/ncu_lora_decode.py
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.bench_lora_decode import Workload, build  # noqa: E402
from kernels.batch import LoraBatch  # noqa: E402
from server.config import ModelConfig  # noqa: E402
from server.pool import QUANTIZED  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--adapters", type=int, default=256)
    ap.add_argument("--ranks", default="8,16,32,64")
    ap.add_argument("--layers", type=int, default=4, help="layers in the pool (one is profiled)")
    ap.add_argument("--adapter-dtype", default="int8", choices=["int8", "int4", "auto"])
    ap.add_argument("--rank-desc", action="store_true", help="tokens sorted by rank, largest first (bench_lora_decode's "
                    "--token-order rank-desc)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    cfg = ModelConfig(hidden_size=4096, intermediate_size=11008, num_layers=args.layers, num_heads=32,
                      num_kv_heads=32, head_dim=128, vocab_size=32000)      # Llama-7B's layers
    ranks = [int(r) for r in args.ranks.split(",")]
    adapter_dtype = QUANTIZED.get(args.adapter_dtype)
    pool, table, slot_rank = build(cfg, args.adapters, ranks, adapter_dtype, torch.float16, dev)
    tok = [slot_rank[t % args.adapters] for t in range(args.tokens)]
    if args.rank_desc:
        tok.sort(key=lambda sr: sr[1], reverse=True)
    slots = [s for s, _ in tok]
    batch = LoraBatch.build([1] * args.tokens, slots, max(ranks), dev)
    work = Workload(cfg, pool, table, batch, torch.float16, dev)
    for layer in range(args.layers):         # compile and warm up every kernel
        for gi in range(2):
            work.apply(layer, gi)
    torch.cuda.synchronize()
    work.step()                               # the profiled layer builds its plans too, as a step does
    torch.cuda.profiler.start()
    for gi in range(2):
        work.apply(1, gi)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print("profiled layer 1: q/k/v and o", flush=True)


if __name__ == "__main__":
    main()
