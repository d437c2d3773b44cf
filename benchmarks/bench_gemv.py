"""What bounds the small-batch decode step: cuBLAS (torch F.linear) against the Triton GEMV
(kernels/triton_gemv.py; its tiles swept) at 1-16 tokens per Llama-7B layer shape, as achieved
weight-read bandwidth against the device-to-device copy bandwidth. Every time is taken the way
the engine's decode graph runs these GEMMs: 8 calls (on 8 copies of the weight, so none is found
in the 50 MB L2) replayed from one CUDA graph, so launch costs on the host do not count. The
last rows replay SwiGLU's activation and down projection (two kernels, or the GEMV that computes
the activation as it reads the weight), then one layer's four GEMMs both ways, the Triton ones
with their default tiles.

    python benchmarks/bench_gemv.py [--tokens 1,4,8,16] [--out FILE.json]   (default: one token)
"""
from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import sys

import torch
import torch.nn.functional as F
import triton.testing

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from benchmarks.bench_kernels import copy_bandwidth  # noqa: E402
from kernels import triton_gemv  # noqa: E402
from kernels.triton_gemv import gemv  # noqa: E402
from kernels.triton_norm_rope import silu_mul  # noqa: E402

SWEEP = [dict(BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s)
         for n, k, w, s in itertools.product((4, 8, 16, 32), (256, 512, 1024), (4, 8), (3, 5))]
SHAPES = {"qkv": (3 * 4096, 4096), "o": (4096, 4096), "gate_up": (2 * 11008, 4096), "down": (4096, 11008),
          "lm_head": (32000, 4096)}
COPIES = 8


def graph_us(calls) -> float:
    """Mean time per call of `calls` (a list of thunks) replayed from one CUDA graph."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    return triton.testing.do_bench(g.replay, warmup=5, rep=50, return_mode="median") * 1e3 / len(calls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--tokens", default="1")
    a = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.float16
    bw = copy_bandwidth(dev)
    rows = []
    ws = {k: [torch.randn(n, k_, dtype=dt, device=dev) * 0.02 for _ in range(COPIES)] for k, (n, k_) in SHAPES.items()}
    frac = lambda nbytes, us: round(nbytes / (us * 1e-6) / bw, 3)  # noqa: E731
    for T in (int(t) for t in a.tokens.split(",")):
        xs = {k: torch.randn(T, m[0].shape[1], dtype=dt, device=dev) for k, m in ws.items()}
        for name, mats in ws.items():
            x = xs[name]
            nbytes = mats[0].numel() * 2
            us = graph_us([lambda w=w: F.linear(x, w) for w in mats])
            err = (gemv(x, mats[0]).float() - F.linear(x, mats[0]).float()).abs().max().item()
            default = graph_us([lambda w=w: gemv(x, w) for w in mats])
            sweep = []
            for cfg in SWEEP:
                try:
                    sweep.append((graph_us([lambda w=w: gemv(x, w, **cfg) for w in mats]), cfg))
                except Exception as e:     # noqa: BLE001  (tiles over the shared memory limit)
                    print(f"skip {cfg}: {type(e).__name__}", file=sys.stderr)
            best_us, best = min(sweep, key=lambda c: c[0])
            rows.append({"tokens": T, "gemm": name, "shape": list(mats[0].shape), "roof_us": round(nbytes / bw * 1e6, 1),
                         "cublas_us": round(us, 1), "cublas_frac_copy_bw": frac(nbytes, us),
                         "triton_us": round(default, 1), "triton_frac_copy_bw": frac(nbytes, default),
                         "triton_vs_cublas": round(default / us, 3), "triton_max_abs_err": err,
                         "best_us": round(best_us, 1), "best_cfg": best})
            print(json.dumps(rows[-1]), flush=True)
        # SwiGLU's down projection with its activation: the activation kernel then the GEMM, against
        # the gated GEMV that computes silu(gate) * up as it streams the weight
        gu = torch.randn(T, 2 * SHAPES["down"][1], dtype=dt, device=dev) * 3
        mats, nbytes = ws["down"], ws["down"][0].numel() * 2
        two = graph_us([lambda w=w: F.linear(silu_mul(gu), w) for w in mats])
        two_tri = graph_us([lambda w=w: gemv(silu_mul(gu), w) for w in mats])
        fused = graph_us([lambda w=w: gemv(gu, w, gated=True) for w in mats])
        sweep = []
        for cfg in SWEEP:
            try:
                sweep.append((graph_us([lambda w=w: gemv(gu, w, gated=True, **cfg) for w in mats]), cfg))
            except Exception as e:     # noqa: BLE001
                print(f"skip {cfg}: {type(e).__name__}", file=sys.stderr)
        best_us, best = min(sweep, key=lambda c: c[0])
        err = (gemv(gu, mats[0], gated=True).float() - F.linear(silu_mul(gu), mats[0]).float()).abs().max().item()
        rows.append({"tokens": T, "gemm": "down_gated", "roof_us": round(nbytes / bw * 1e6, 1),
                     "silu_then_cublas_us": round(two, 1), "silu_then_triton_us": round(two_tri, 1),
                     "gated_triton_us": round(fused, 1), "gated_frac_copy_bw": frac(nbytes, fused),
                     "gated_max_abs_err": err, "best_us": round(best_us, 1), "best_cfg": best})
        print(json.dumps(rows[-1]), flush=True)
        layer = [k for k in SHAPES if k != "lm_head"]
        nbytes = sum(ws[k][0].numel() * 2 for k in layer)
        row = {"tokens": T, "gemm": "layer", "roof_us": round(nbytes / bw * 1e6, 1)}
        # "engine": what the decode graph runs (kernels/triton_gemv.linear's rule, default tiles)
        engine = lambda x, w: gemv(x, w) if T == 1 else F.linear(x, w)  # noqa: E731
        for how, fn in (("cublas", F.linear), ("triton", gemv), ("engine", engine)):
            us = graph_us([lambda k=k, i=i, fn=fn: fn(xs[k], ws[k][i]) for i in range(COPIES) for k in layer]) * len(layer)
            row.update({f"{how}_us": round(us, 1), f"{how}_frac_copy_bw": frac(nbytes, us)})
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bw_GBps": round(bw / 1e9, 1),
           "triton_default": triton_gemv.TUNE["gemv"], "rows": rows}
    if a.out:
        pathlib.Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
