"""How fast can one launch read scattered rows, as a function of how far apart they lie?

The decode LoRA kernels read each token's adapter rows (4 KB int8, 8 KB fp16 rows of a 4096-wide
module) from wherever the pool put them. In the engine they reached ~57% of the copy bandwidth
with int8 rows and ~80% with fp16, against ~87% in the kernel benchmark's compact pool. This probe
takes the kernels out: a launch reads N rows at random offsets inside a region of S bytes, one
program per row, and reports the bandwidth against S and the row size. If it falls as S grows,
address translation (TLB reach) bounds the engine; if it falls as rows shrink, the per-program
cost does (on the H100 it was the latter: benchmarks/results/tune-sweep-2026-11-25j-h100).

    python benchmarks/gather_probe.py --out DIR [--rows 32768] [--row-bytes 4096]
"""
from __future__ import annotations

import argparse
import json
import pathlib

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_rows_kernel(buf_ptr, offs_ptr, out_ptr, ROW: tl.constexpr, BLOCK: tl.constexpr):
    """out[p] = a checksum of the ROW bytes at buf + offs[p] (so nothing is optimized away)."""
    p = tl.program_id(0)
    off = tl.multiple_of(tl.load(offs_ptr + p), 256)
    idx = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for k0 in range(0, ROW, BLOCK):
        acc += tl.load(buf_ptr + off + k0 + idx).to(tl.int32)
    tl.store(out_ptr + p, tl.sum(acc, 0))


def gather(buf: torch.Tensor, offs: torch.Tensor, out: torch.Tensor, row: int, block: int, warps: int) -> None:
    _gather_rows_kernel[(offs.numel(),)](buf, offs, out, ROW=row, BLOCK=block, num_warps=warps)


def timed_ms(fn, reps: int) -> float:
    """Median ms of fn from a CUDA graph of one call, replayed."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", type=int, default=32768)
    ap.add_argument("--row-bytes", type=int, default=4096)
    ap.add_argument("--regions-gb", default="0.125,0.5,2,8,16,32,54")
    ap.add_argument("--tiles", default="256w1,1024w4", help="BLOCKwWARPS per variant")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    dev = torch.device("cuda")
    regions = [float(s) for s in args.regions_gb.split(",")]
    buf = torch.empty(int(max(regions) * (1 << 30)), dtype=torch.int8, device=dev)
    buf.random_(-100, 100)
    out = torch.empty(args.rows, dtype=torch.int32, device=dev)
    total = args.rows * args.row_bytes
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'region GB':>9} {'layout':<8} {'tile':<8} {'us':>8} {'GB/s':>8}", flush=True)
    for gb in regions:
        slots = int(gb * (1 << 30)) // args.row_bytes
        if slots < args.rows:
            continue
        picked = torch.randperm(slots, generator=gen)[: args.rows] * args.row_bytes
        for layout, offs in (("random", picked), ("sorted", picked.sort().values)):
            offs = offs.to(dev)
            for tile in args.tiles.split(","):
                block, warps = (int(v) for v in tile.split("w"))
                ms = timed_ms(lambda: gather(buf, offs, out, args.row_bytes, block, warps), args.reps)
                rows.append({"region_gb": gb, "layout": layout, "tile": tile, "us": ms * 1e3, "gbps": total / ms / 1e6})
                print(f"{gb:9.3f} {layout:<8} {tile:<8} {ms * 1e3:8.1f} {total / ms / 1e6:8.0f}", flush=True)
    outdir = pathlib.Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "gather-probe.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": args.rows,
                                                          "row_bytes": args.row_bytes, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
