"""Decode LoRA beside the base GEMM, with cuBLAS held to fewer SMs: does the overlap pay?

The engine runs each attention group's LoRA after its base GEMM (q/k/v: shrink, expand into the
fused qkv output; o: the same into the o output). Both halves of a pair read the same input, so the
LoRA could run beside the GEMM on a second stream. That was measured (call I,
results/lora-decode-2026-12-03-h200) and bought nothing: cuBLAS's kernels take every SM, so the
LoRA programs only ran in the GEMM's tail. This probe adds the missing half: an SM carve-out for
the GEMM (``torch._C._set_sm_carveout_experimental``, which cuBLASLt honours as its SM count
target), so C SMs are free for the LoRA while the GEMM runs and all of them after.

Per layer, for 32 layers with weights of their own (Llama-7B shapes, 256 decode tokens over 256
distinct adapters), captured in one CUDA graph per variant and replayed in alternating rounds:

* ``gemm`` / ``gemm-lt``: the two base GEMMs alone (q/k/v 4096 -> 12288, o 4096 -> 4096), on
  cuBLAS / cuBLASLt; ``gemm-lt-cC``: the same at carve-out C;
* ``serial`` / ``serial-lt``: the engine today: each GEMM, then its LoRA in line;
* ``side-lt`` / ``side-lt-cC``: each GEMM (at carve-out C) beside its LoRA on a second stream
  (q/k/v's delta into a zeroed buffer added after the join, where the engine would fuse it into
  rope; o's delta into the residual, as x + (o W^T + d) = (x + d) + o W^T).

The number that matters is each variant's LoRA cost: its time minus ``gemm``'s (cuBLASLt where the
variant uses it). Outputs are checked against the serial order before timing. On the H200 the
pair cost 0.89-0.96x of serial at C = 16..64 (results/lora-overlap-2026-12-03-h200): the LoRA
kernels are bound by SM throughput, so SMs taken from the GEMM only move time between them.
``--cpu-smoke`` runs tiny shapes on the CPU (one stream, no carve-out), for the smoke test.

    python benchmarks/bench_lora_overlap.py --out DIR
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pathlib
import statistics
import sys

if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported

import torch  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.bench_lora_decode import Workload, build, graph, replay_ms, sync  # noqa: E402
from kernels import triton_lora as tlora  # noqa: E402
from kernels.batch import LoraBatch  # noqa: E402
from server.config import ModelConfig  # noqa: E402


@contextlib.contextmanager
def carve(c: int | None):
    """cuBLAS(Lt) GEMMs launched inside leave ``c`` SMs free."""
    if not c or not torch.cuda.is_available():
        yield
        return
    torch._C._set_sm_carveout_experimental(c)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(None)


class Layers:
    """The two attention GEMMs of every layer and their LoRA groups."""

    def __init__(self, work: Workload, n_layers: int, dev, dtype):
        self.work = work
        cfg = work.cfg
        (_, _, wq, xq, _), (_, _, wo, xo, _) = work.groups
        self.xq, self.xo = xq, xo
        self.Wq = [torch.randn(sum(wq), xq.shape[1], device=dev, dtype=dtype) * 0.02 for _ in range(n_layers)]
        self.Wo = [torch.randn(sum(wo), xo.shape[1], device=dev, dtype=dtype) * 0.02 for _ in range(n_layers)]
        self.resid = torch.zeros(xq.shape[0], cfg.hidden_size, device=dev, dtype=dtype)
        self.cuda = dev.type == "cuda"
        self.side = torch.cuda.Stream(dev) if self.cuda else None     # (--cpu-smoke: one stream)
        self.n = n_layers

    def _beside(self, gemm, lora, c: int | None):
        """gemm() at carve-out c on the current stream and lora() on the side stream, forked after
        what is queued and joined before what follows; returns both results."""
        if self.cuda:
            self.side.wait_stream(torch.cuda.current_stream())
        with carve(c):
            out = gemm()
        with torch.cuda.stream(self.side) if self.cuda else contextlib.nullcontext():
            delta = lora()
        if self.cuda:
            torch.cuda.current_stream().wait_stream(self.side)
        return out, delta

    def _qkv_delta(self, li: int) -> torch.Tensor:
        """q/k/v's LoRA delta alone, into a zeroed buffer (allocated and zeroed on the side stream)."""
        dq = torch.zeros(self.xq.shape[0], self.Wq[li].shape[0], device=self.xq.device, dtype=self.xq.dtype)
        self.work.apply(li, 0, dq)
        return dq

    def run(self, mode: str, c: int | None = None) -> list[torch.Tensor]:
        """One pass over the layers; returns each layer's q/k/v and o outputs (in "side" mode o's
        LoRA delta is in the residual instead)."""
        apply = self.work.apply
        outs = []
        for li in range(self.n):
            if mode == "side":
                qkv, dq = self._beside(lambda: self.xq @ self.Wq[li].t(), lambda: self._qkv_delta(li), c)
                qkv.add_(dq)
                out, _ = self._beside(lambda: self.xo @ self.Wo[li].t(), lambda: apply(li, 1, self.resid), c)
            else:
                with carve(c):
                    qkv = self.xq @ self.Wq[li].t()
                if mode == "serial":
                    apply(li, 0, qkv)
                with carve(c):
                    out = self.xo @ self.Wo[li].t()
                if mode == "serial":
                    apply(li, 1, out)
            outs += [qkv, out]
        return outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--adapters", type=int, default=256)
    ap.add_argument("--ranks", default="8,16,32,64")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--carveouts", default="16,24,32,48,64")
    ap.add_argument("--adapter-dtype", default="int8", choices=["int8", "auto"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny shapes on the CPU under TRITON_INTERPRET=1, one stream, no carve-out")
    args = ap.parse_args()
    dev, dtype = torch.device("cpu" if args.cpu_smoke else "cuda"), torch.float16
    if args.cpu_smoke:
        cfg = ModelConfig(hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=4,
                          head_dim=16, vocab_size=100)
        args.tokens, args.adapters, args.layers, args.rounds, args.reps, args.carveouts = 6, 3, 1, 1, 1, "16"
        dtype = torch.float32     # CPU matmuls
    else:
        cfg = ModelConfig(hidden_size=4096, intermediate_size=11008, num_layers=args.layers, num_heads=32,
                          num_kv_heads=32, head_dim=128, vocab_size=32000)
    adapter_dtype = torch.int8 if args.adapter_dtype == "int8" else None
    ranks = [int(r) for r in args.ranks.split(",")]
    pool, table, slot_rank = build(cfg, args.adapters, ranks, adapter_dtype, dtype, dev)
    tok = [slot_rank[t % len(slot_rank)] for t in range(args.tokens)]
    batch = LoraBatch.build([1] * args.tokens, [s for s, _ in tok], max(ranks), dev)
    work = Workload(cfg, pool, table, batch, dtype, dev)
    L = Layers(work, args.layers, dev, dtype)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 0
    carves = [int(c) for c in args.carveouts.split(",") if c]

    # variants: (name, cublas backend, mode, carve-out)
    variants = [("gemm", "cublas", "gemm", None), ("serial", "cublas", "serial", None),
                ("gemm-lt", "cublaslt", "gemm", None), ("serial-lt", "cublaslt", "serial", None),
                ("side-lt", "cublaslt", "side", None)]
    for c in carves:
        variants += [(f"gemm-lt-c{c}", "cublaslt", "gemm", c), (f"side-lt-c{c}", "cublaslt", "side", c)]

    def blas(backend) -> None:
        """Set cuBLAS's preferred library (nothing to choose on the CPU)."""
        if dev.type == "cuda":
            torch.backends.cuda.preferred_blas_library(backend)

    backend0 = torch.backends.cuda.preferred_blas_library() if dev.type == "cuda" else None

    # correctness: each side variant's q/k/v outputs and residual against the serial order
    def outputs(mode, c):
        L.resid.zero_()
        outs = L.run(mode, c)
        sync(dev)
        q = torch.stack([o.float() for o in outs[0::2]])
        o = torch.stack([o.float() for o in outs[1::2]]).sum(0) + L.resid.float()   # o's delta may sit in resid
        return q, o

    blas("cublas")
    q_ref, o_ref = outputs("serial", None)
    graphs, res = {}, {}
    for name, backend, mode, c in variants:
        blas(backend)
        err = None
        if mode == "side":
            q, o = outputs(mode, c)
            err = max(float((q - q_ref).norm() / q_ref.norm()), float((o - o_ref).norm() / o_ref.norm()))
        graphs[name] = (backend, graph(lambda mode=mode, c=c: L.run(mode, c)))
        res[name] = {"backend": backend, "mode": mode, "carveout": c, "rel_err": err, "ms": []}
        print(f"{name}: captured" + (f", rel err vs serial {err:.1e}" if err is not None else ""), flush=True)
    if backend0 is not None:
        blas(backend0)
    for rnd in range(args.rounds):
        for name, (_, g) in graphs.items():
            res[name]["ms"].append(replay_ms(g, args.reps))
        print(f"round {rnd + 1}: " + ", ".join(f"{n} {statistics.median(r['ms']):.3f}" for n, r in res.items()),
              flush=True)
    for r in res.values():
        r["median_ms"] = statistics.median(r["ms"])
    gemm = {"cublas": res["gemm"]["median_ms"], "cublaslt": res["gemm-lt"]["median_ms"]}
    lora_serial = res["serial"]["median_ms"] - gemm["cublas"]
    stamp = pathlib.Path(".commit")
    meta = {"date": datetime.date.today().isoformat(), "commit": stamp.read_text().strip() if stamp.exists() else "?",
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke)", "sms": sms,
            "torch": torch.__version__,
            "triton": __import__("triton").__version__, "tokens": args.tokens, "adapters": args.adapters,
            "ranks": ranks, "layers": args.layers, "adapter_dtype": args.adapter_dtype, "rounds": args.rounds,
            "reps": args.reps, "command": " ".join(sys.argv), "tune": tlora.TUNE}
    lines = [f"# decode LoRA beside the base GEMM, {args.tokens} tokens over {args.adapters} adapters, "
             f"{args.layers} layers", "",
             f"{meta['device']} ({sms} SMs), {meta['date']}, commit {meta['commit']}, torch {meta['torch']}; "
             f"{args.adapter_dtype} rows; medians of {args.rounds} alternating rounds of {args.reps} graph replays.",
             "", f"    {meta['command']}", "",
             "LoRA ms = the variant minus the GEMMs alone on the same cuBLAS backend with no carve-out.", "",
             "| variant | step ms | LoRA ms | LoRA vs serial | rel err vs serial |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, r in res.items():
        lora = r["median_ms"] - gemm[r["backend"]]
        err = "" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
        lines.append(f"| {name} | {r['median_ms']:.3f} | {lora:.3f} | {lora / lora_serial:.2f} | {err} |")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lora_overlap.json").write_text(json.dumps({"meta": meta, "results": res}, indent=1, default=str))
    (out / "lora_overlap.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
