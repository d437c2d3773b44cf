"""What bounds the batch-1 decode step: cuBLAS (torch F.linear) at one token per Llama-7B layer
shape, as achieved weight-read bandwidth against the device-to-device copy bandwidth, and the
same four GEMVs of a layer replayed from one CUDA graph (as the engine's decode graph runs them).

    python benchmarks/bench_gemv.py [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch
import torch.nn.functional as F
import triton.testing

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from benchmarks.bench_kernels import copy_bandwidth  # noqa: E402

SHAPES = {"qkv": (3 * 4096, 4096), "o": (4096, 4096), "gate_up": (2 * 11008, 4096), "down": (4096, 11008),
          "lm_head": (32000, 4096)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--tokens", default="1,8")
    a = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.float16
    bw = copy_bandwidth(dev)
    rows = []
    for T in (int(t) for t in a.tokens.split(",")):
        # 8 copies of each weight, rotated, so no call finds its weight in the 50 MB L2
        ws = {k: [torch.randn(n, k_, dtype=dt, device=dev) * 0.02 for _ in range(8)] for k, (n, k_) in SHAPES.items()}
        for name, mats in ws.items():
            x = torch.randn(T, mats[0].shape[1], dtype=dt, device=dev)
            it = iter(range(1 << 30))
            ms = triton.testing.do_bench(lambda: F.linear(x, mats[next(it) % 8]), warmup=20, rep=200,
                                         return_mode="median")
            nbytes = mats[0].numel() * 2
            rows.append({"tokens": T, "gemm": name, "shape": list(mats[0].shape), "us": round(ms * 1e3, 1),
                         "GBps": round(nbytes / (ms * 1e-3) / 1e9), "frac_copy_bw": round(nbytes / (ms * 1e-3) / bw, 3)})
            print(json.dumps(rows[-1]), flush=True)
        # one layer's four GEMVs, 8 layers deep, from a CUDA graph
        xs = {k: torch.randn(T, m[0].shape[1], dtype=dt, device=dev) for k, m in ws.items()}
        layer = [k for k in SHAPES if k != "lm_head"]

        def run():
            for i in range(8):
                for k in layer:
                    F.linear(xs[k], ws[k][i])
        run()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run()
        ms = triton.testing.do_bench(g.replay, warmup=10, rep=200, return_mode="median") / 8
        nbytes = sum(ws[k][0].numel() * 2 for k in layer)
        rows.append({"tokens": T, "gemm": "layer (graph)", "us": round(ms * 1e3, 1), "roof_us": round(nbytes / bw * 1e6, 1),
                     "frac_copy_bw": round(nbytes / (ms * 1e-3) / bw, 3)})
        print(json.dumps(rows[-1]), flush=True)
        del ws
        torch.cuda.empty_cache()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bw_GBps": round(bw / 1e9, 1),
           "rows": rows}
    if a.out:
        pathlib.Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
