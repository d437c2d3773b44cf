"""Prefill LoRA tiles, kernel by kernel: the segment shrink and expand timed apart per case.

``bench_kernels.py --sweep`` picks one tile per kernel by a geometric mean over its cases; this
tool prints every (variant, case) time of each kernel alone, so a tile rule that depends on the
case (how many segments, how long, which ranks) can be read off. Cases are built as
``bench_kernels.run_prefill_lora`` builds them (same adapters, same rotation), and each variant's
output is checked against the torch reference once.

    python benchmarks/sweep_prefill_lora.py --out DIR [--cases 512:8:0,1024:4:0] [--variants F.json]

A variants file is {"shrink_seg": [{...}, ...], "expand_seg": [{...}, ...]}: each dict updates
the committed TUNE entry (an empty dict is the committed tile). Writes prefill_sweep.json and .md.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import bench_kernels as bk  # noqa: E402
from kernels import reference as ref  # noqa: E402
from kernels import triton_lora as tlora  # noqa: E402
from kernels.batch import LoraBatch  # noqa: E402
from server.config import TARGET_MODULES  # noqa: E402

CASES = "8:1:64,64:1:64,512:1:64,512:8:0,1024:4:0,4096:1:64,4096:64:0"
VARIANTS = {
    "shrink_seg": [{}] + [{"SPLIT_FILL": f} for f in (0.5, 1, 2, 4)]
    + [{"BLOCK_M": bm, "SPLIT_K": sk} for bm in (16, 32, 64) for sk in (1, 2, 4, 8)]
    + [{"BLOCK_K": 64, "num_stages": 6, "SPLIT_FILL": 1}, {"num_warps": 4, "SPLIT_FILL": 1},
       {"BLOCK_N": 32, "SPLIT_FILL": 1}, {"BLOCK_N": 128, "SPLIT_FILL": 1}],
    "expand_seg": [{}] + [{"BLOCK_M": bm, "BLOCK_N": bn} for bm in (32, 128) for bn in (64, 128, 256)]
    + [{"BLOCK_N": 64}, {"BLOCK_N": 256, "num_warps": 8}, {"BLOCK_K": 32}, {"BLOCK_K": 16},
       {"num_stages": 3}, {"num_warps": 8}, {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8}],
}


def build_case(pool, table, ranks, dtype, dev, tokens, nseg, rank, nrot=3):
    """Rotated (batch, x, y, v) sets as run_prefill_lora draws them, and cuBLAS's rank."""
    d = pool.cfg.hidden_size
    meta = table.meta[:, 0, TARGET_MODULES.index("q_proj")]
    base, extra = divmod(tokens, nseg)
    lens = [base + (1 if i < extra else 0) for i in range(nseg)]
    cand = [i for i in range(len(ranks)) if rank is None or ranks[i] == rank]
    sets, flops = [], 0
    for k in range(nrot):
        ids = [cand[(k * nseg + i) % len(cand)] for i in range(nseg)]
        b = LoraBatch.build(lens, ids, max(ranks[i] for i in ids), dev)
        x = torch.randn(tokens, d, dtype=dtype, device=dev)
        y = torch.randn(tokens, d, dtype=dtype, device=dev)
        sets.append((b, x, y, ref.lora_shrink(x, pool.flat, table.rows, meta, b)))
        flops = max(flops, sum(4 * n * d * ranks[i] for n, i in zip(lens, ids)))
    return meta, sets, max(8, int(round(flops / (4 * tokens * d) / 8)) * 8)


def check(kind, pool, table, meta, st) -> float:
    b, x, y, v = st
    if kind == "shrink_seg":
        return bk.rel(tlora.lora_shrink(x, pool.flat, table.rows, meta, b), v)
    y0 = torch.randn_like(y)
    y1, y2 = y0.clone(), y0.clone()
    tlora.lora_expand(y1, v, pool.flat, table.rows, meta, table.scaling, b)
    ref.lora_expand(y2, v, pool.flat, table.rows, meta, table.scaling, b)
    return bk.rel(y1.float() - y0.float(), y2.float() - y0.float())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cases", default=CASES, help="tokens:segments:rank,... (rank 0: mixed)")
    ap.add_argument("--variants", default="", help="JSON file of variants per kernel (default: the built-in list)")
    ap.add_argument("--adapters", type=int, default=64)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    a = ap.parse_args(argv)
    dev, dtype = torch.device("cuda"), torch.float16
    cfg = bk.LLAMA7B
    cases = [(int(t), int(n), int(r) or None) for t, n, r in (c.split(":") for c in a.cases.split(","))]
    variants = json.loads(pathlib.Path(a.variants).read_text()) if a.variants else VARIANTS
    if a.cpu_smoke:
        bk.SMOKE = True
        dev = torch.device("cpu")
        cfg = bk.ModelConfig(hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4, num_kv_heads=4,
                             head_dim=16, vocab_size=64)
        cases = [(40, 1, 16), (40, 4, None)]
        variants = {k: v[:2] for k, v in variants.items()}
    pool, table, ranks = bk.build_lora_pool(cfg, a.adapters, dtype, dev)
    built = {c: build_case(pool, table, ranks, dtype, dev, *c) for c in cases}
    rows = []
    for (T, n, r), (meta, sets, r_eq) in built.items():
        At = torch.randn(cfg.hidden_size, r_eq, dtype=dtype, device=dev) / 64
        Bt = torch.randn(r_eq, cfg.hidden_size, dtype=dtype, device=dev) / 8
        ms = bk.graph_bench(lambda b, x, y, v: torch.addmm(y, torch.mm(x, At), Bt, alpha=2.0, out=y), sets)
        rows.append({"case": f"{T}:{n}:{r or 0}", "kernel": "cublas", "cfg": {"rank": r_eq}, "ms": ms})
    for kind, vars_ in variants.items():
        default = copy.deepcopy(tlora.TUNE[kind])
        for var in vars_:
            tlora.TUNE[kind] = {**default, **var}
            for (T, n, r), (meta, sets, _) in built.items():
                if kind == "shrink_seg":
                    fn = lambda b, x, y, v: tlora.lora_shrink(x, pool.flat, table.rows, meta, b)  # noqa: E731
                else:
                    fn = lambda b, x, y, v: tlora.lora_expand(y, v, pool.flat, table.rows, meta, table.scaling, b)  # noqa: E731
                try:
                    err = check(kind, pool, table, meta, sets[0])
                    ms = bk.graph_bench(fn, sets)
                except Exception as e:  # noqa: BLE001
                    print(f"{kind} {var} {T}:{n}:{r}: FAILED {repr(e)[:200]}", flush=True)
                    continue
                rows.append({"case": f"{T}:{n}:{r or 0}", "kernel": kind, "cfg": var, "ms": ms, "rel_err": err})
                print(f"{kind:10s} {T:5d}:{n:3d}:{str(r or 'mix'):>3} {json.dumps(var):60s} {ms * 1e3:8.1f} us  err {err:.1e}",
                      flush=True)
        tlora.TUNE[kind] = default
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke)",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": os.environ.get("BENCH_COMMIT", "unknown"), "torch": torch.__version__,
            "command": " ".join(["python", "benchmarks/sweep_prefill_lora.py"] + (argv or sys.argv[1:]))}
    (out / "prefill_sweep.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "prefill_sweep.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


def markdown(meta, rows) -> str:
    """One table per kernel: variants down, cases across (us), and the best of each case."""
    cases = list(dict.fromkeys(r["case"] for r in rows))
    lines = [f"# prefill LoRA tiles, kernel by kernel\n\n{meta['device']}, {meta['date']}, commit {meta['commit']}, "
             f"torch {meta['torch']}\n\n    {meta['command']}\n"]
    cub = {r["case"]: r["ms"] for r in rows if r["kernel"] == "cublas"}
    lines.append("cuBLAS mm + addmm of the same FLOPs on one adapter (us): "
                 + ", ".join(f"{c} {cub[c] * 1e3:.1f}" for c in cases if c in cub) + "\n")
    for kind in ("shrink_seg", "expand_seg"):
        got = [r for r in rows if r["kernel"] == kind]
        if not got:
            continue
        lines.append(f"## {kind}\n\n| variant | " + " | ".join(cases) + " | max err |")
        lines.append("| --- |" + " ---: |" * (len(cases) + 1))
        best = {c: min(r["ms"] for r in got if r["case"] == c) for c in cases if any(r["case"] == c for r in got)}
        for cfg in list(dict.fromkeys(json.dumps(r["cfg"]) for r in got)):
            by = {r["case"]: r for r in got if json.dumps(r["cfg"]) == cfg}
            cells = [(f"**{by[c]['ms'] * 1e3:.1f}**" if by[c]["ms"] == best[c] else f"{by[c]['ms'] * 1e3:.1f}")
                     if c in by else "-" for c in cases]
            err = max(r["rel_err"] for r in by.values())
            lines.append(f"| `{cfg}` | " + " | ".join(cells) + f" | {err:.1e} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
