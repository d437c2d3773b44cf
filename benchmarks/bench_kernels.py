"""Kernel benchmark: Triton LoRA and paged attention vs roofline, torch baselines and cuBLAS.

One run times, on one CUDA device, at S-LoRA's settings (Llama-7B shapes, fp16 by default):

* decode LoRA: shrink+expand for the 4 attention projections (q, k, v, o: 4096 -> 4096), batch
  1..256 tokens, ranks 8/16/32/64/128 mixed, 1..256 distinct adapters out of a pool of up to 1000;
* prefill LoRA: shrink+expand for one projection, 8..4096 tokens in 1..1000 segments;
* decode attention at batch 1..256, context 1024 (MHA and GQA); prefill attention.

Each row gives the Triton time (triton.testing.do_bench, median, inputs rotated so the L2 does not
hold them), the bytes-moved roofline (bytes / measured device-to-device copy bandwidth, read +
write), and baselines: a torch loop of per-adapter matmuls (kernels.reference), padded bmm over
gathered weights (decode), cuBLAS (torch.mm) with contiguous weights of the same FLOPs (prefill),
and torch SDPA over contiguous K/V (attention). Writes kernels.json and kernels.md to --out.

    python benchmarks/bench_kernels.py --out DIR
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import torch
import triton
import triton.testing

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from kernels import reference as ref  # noqa: E402
from kernels import triton_attention as tatt  # noqa: E402
from kernels import triton_lora as tlora  # noqa: E402
from kernels.batch import AttnBatch, LoraBatch  # noqa: E402
from server.config import TARGET_MODULES, ModelConfig  # noqa: E402
from server.lora import LoraWeights  # noqa: E402
from server.pool import QUANTIZED, AdapterTable, UnifiedPool, stage_adapter  # noqa: E402

RANKS = (8, 16, 32, 64, 128)
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
LLAMA7B = ModelConfig(hidden_size=4096, intermediate_size=11008, num_layers=1, num_heads=32, num_kv_heads=32,
                      head_dim=128, vocab_size=32000)
GQA = ModelConfig(hidden_size=4096, intermediate_size=14336, num_layers=1, num_heads=32, num_kv_heads=8,
                  head_dim=128, vocab_size=32000)


TUNE_OUT = None  # where --sweep writes the chosen tiles (tune.json in --out)
SMOKE = False   # --cpu-smoke: run every code path once on the CPU (Triton interpreter), no timing


def bench(fn, sets=None, warmup=10, rep=60):
    """Median ms of fn(*set), cycling through input sets."""
    if SMOKE:
        t = time.perf_counter()
        fn(*sets[0]) if sets else fn()
        return (time.perf_counter() - t) * 1e3
    if sets is None:
        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    it = itertools.cycle(sets)
    return triton.testing.do_bench(lambda: fn(*next(it)), warmup=warmup, rep=rep, return_mode="median")


def empty_cache():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def copy_bandwidth(dev) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    n = 1 << (16 if SMOKE else 28)   # 512 MiB of fp16
    a = torch.empty(n, dtype=torch.float16, device=dev).normal_()
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a), rep=200)
    del a, b
    return 2 * n * 2 / (ms * 1e-3)


def mm_rate(dev, dtype) -> float:
    n = 64 if SMOKE else 8192
    a = torch.randn(n, n, dtype=dtype, device=dev)
    b = torch.randn(n, n, dtype=dtype, device=dev)
    ms = bench(lambda: a @ b, rep=200)
    return 2 * n ** 3 / (ms * 1e-3)


# ------------------------------------------------------------------------------------------------
# a pool of many adapters (real pool/table/staging); staged images are reused across slots, so
# building 1000 adapters costs 10 stagings and 1000 device copies, each into pages of its own
# ------------------------------------------------------------------------------------------------
def build_lora_pool(cfg, n_adapters, dtype, dev, modules=ATTN_MODULES, variants=2, adapter_dtype=None):
    g = torch.Generator().manual_seed(0)
    probe = UnifiedPool(cfg, 1, 16, dtype, "cpu", adapter_dtype)
    staged = {}
    for r in RANKS:
        for k in range(variants):
            w = {}
            for m in modules:
                d_in, d_out = cfg.module_dims(m)
                w[(0, m)] = (torch.randn(r, d_in, generator=g) / d_in ** 0.5, torch.randn(d_out, r, generator=g) / r ** 0.5)
            staged[(r, k)] = stage_adapter(LoraWeights(f"r{r}v{k}", r, 2 * r, 2.0, list(modules), False, w), probe)
    need = sum(staged[(RANKS[i % len(RANKS)], (i // len(RANKS)) % variants)].num_pages for i in range(n_adapters))
    pool = UnifiedPool(cfg, need + 8, 16, dtype, dev, adapter_dtype)
    table = AdapterTable(pool, n_adapters)
    ranks = []
    for i in range(n_adapters):
        r = RANKS[i % len(RANKS)]
        table.insert(staged[(r, (i // len(RANKS)) % variants)])
        ranks.append(r)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return pool, table, ranks


def graph_ms(fn, sets):
    """graph_bench, or None where capture fails (printed)."""
    if SMOKE:
        return None
    try:
        return graph_bench(fn, sets)
    except Exception as e:  # noqa: BLE001
        print("graph capture failed:", repr(e)[:200], flush=True)
        return None


def graph_bench(fn, sets):
    """Median ms per call of fn over rotated input sets, from a CUDA graph that runs each set once
    (no launch overhead; consecutive calls touch different inputs, so the L2 is not warm)."""
    if SMOKE:
        return bench(fn, sets)
    for st in sets:
        fn(*st)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for st in sets:
            fn(*st)
    return bench(lambda: g.replay(), rep=50) / len(sets)


def shrink(mod, x, table, meta, b):
    """lora_shrink of the Triton kernels or the reference (mod) over the table's rows, in whatever
    format the pool stores them (--adapter-dtype)."""
    return mod.lora_shrink(x, table.flat, table.rows, meta, b, table.row_scale)


def expand(mod, y, v, table, meta, b, widths=None):
    """lora_expand, as shrink."""
    mod.lora_expand(y, v, table.flat, table.rows, meta, table.scaling, b, widths, row_scale=table.row_scale)


def apply(mod, y, x, table, meta, b, widths=None):
    """lora_apply (shrink then expand, or the fused decode launch with int8 / int4 rows), as the
    model calls it."""
    mod.lora_apply(y, x, table.flat, table.rows, meta, table.scaling, b, widths, row_scale=table.row_scale)


def lora_bytes(T, d_in, d_out, R, distinct_ranks, esize, wsize):
    """Fewest bytes: each distinct adapter's A and B once (wsize a weight: the rows' format), x
    read, v written+read, y read+written."""
    w = sum(r * (d_in + d_out) for r in distinct_ranks) * wsize
    return w + T * d_in * esize + 2 * T * R * esize + 2 * T * d_out * esize


def run_decode_lora(res, pool, table, ranks, dtype, dev, bw, tokens, distinct, nrot=4, baselines=True):
    cfg = pool.cfg
    d = cfg.hidden_size
    N = len(ranks)
    esize = torch.tensor([], dtype=dtype).element_size()
    metas = [table.meta[:, 0, TARGET_MODULES.index(m)] for m in ATTN_MODULES]
    sets, roof_bytes = [], 0
    for k in range(nrot):
        # distinct adapters of this rotation: a window of the pool that moves each rotation
        ids = [(k * distinct + i) % N for i in range(distinct)]
        slots = [ids[t % distinct] for t in range(tokens)]
        R = max(ranks[i] for i in ids)
        b = LoraBatch.build([1] * tokens, slots, R, dev)
        x = torch.randn(tokens, d, dtype=dtype, device=dev)
        ys = [torch.randn(tokens, d, dtype=dtype, device=dev) for _ in ATTN_MODULES]
        sets.append((b, x, ys))
        roof_bytes = max(roof_bytes, 4 * lora_bytes(tokens, d, d, R, [ranks[i] for i in ids], esize, pool.weight_bytes))

    def tri(b, x, ys):      # as the model runs it (quantized rows: one fused launch a module)
        for meta, y in zip(metas, ys):
            apply(tlora, y, x, table, meta, b)

    t_tri = bench(tri, sets)
    row = {"kind": "decode_lora", "tokens": tokens, "distinct": distinct, "ms": t_tri,
           "roof_ms": roof_bytes / bw * 1e3, "bytes": roof_bytes}
    row["frac_roof"] = row["roof_ms"] / t_tri
    # the split kernels: shrink alone and expand alone (first rotation set, all 4 modules)
    b, x, ys = sets[0]
    vs = [shrink(tlora, x, table, m, b) for m in metas]
    row["shrink_ms"] = bench(lambda b, x: [shrink(tlora, x, table, m, b) for m in metas],
                             [(s[0], s[1]) for s in sets])
    row["expand_ms"] = bench(lambda b, ys: [expand(tlora, y, v, table, m, b)
                                            for m, y, v in zip(metas, ys, vs)], [(s[0], s[2]) for s in sets])
    # CUDA graph of the 8 launches (what a graph-captured decode step would see)
    row["graph_ms"] = graph_ms(tri, sets)
    if row["graph_ms"]:
        row["graph_frac_roof"] = row["roof_ms"] / row["graph_ms"]
    # grouped schedule: the same tokens sorted by adapter (what the engine sends when adapters repeat)
    gsets = [(LoraBatch.build([1] * tokens, sorted(h[2] for h in b.seg_host), b.max_rank, dev, grouped=True), x, ys)
             for b, x, ys in sets]
    row["grouped_graph_ms"] = graph_ms(tri, gsets)
    if row["grouped_graph_ms"]:
        row["grouped_frac_roof"] = row["roof_ms"] / row["grouped_graph_ms"]
    if baselines:
        row["torch_loop_ms"] = bench(lambda b, x, ys: [expand(ref, y, shrink(ref, x, table, m, b), table, m, b)
                                                       for m, y in zip(metas, ys)], sets[:1], warmup=2, rep=20)
        # padded bmm (Punica's naive baseline): weights stacked once (outside the timing, padded to
        # the batch's max rank), each step gathers every token's A and B and runs two bmm's
        b, x, ys = sets[0]
        Rm = b.max_rank
        ids = sorted(set(b.seg_host[i][2] for i in range(len(b.seg_host))))
        A = torch.zeros(len(ids), Rm, d, dtype=dtype, device=dev)
        Bt = torch.zeros(len(ids), Rm, d, dtype=dtype, device=dev)
        meta = metas[0]
        for j, s in enumerate(ids):
            a0, b0, r, _ = (int(z) for z in meta[s])
            A[j, :r] = ref.gather_rows(table.flat, table.rows, a0, r, d, table.row_scale)
            Bt[j, :r] = ref.gather_rows(table.flat, table.rows, b0, r, d, table.row_scale)
        where = {s: j for j, s in enumerate(ids)}
        idx = torch.tensor([where[h[2]] for h in b.seg_host], device=dev)
        sc = table.scaling[torch.tensor([h[2] for h in b.seg_host], device=dev)].to(dtype)[:, None]

        def bmm():
            for y in ys:
                v = torch.bmm(x[:, None, :], A[idx].transpose(1, 2))
                y += torch.bmm(v, Bt[idx])[:, 0] * sc
        row["torch_bmm_ms"] = bench(bmm, warmup=2, rep=30)
        del A, Bt
    res.append(row)
    print(f"decode_lora T={tokens:4d} distinct={distinct:4d}: {t_tri*1e3:8.1f} us  roof {row['roof_ms']*1e3:8.1f} us "
          f"({100*row['frac_roof']:5.1f}%)  graph {row['graph_ms'] and row['graph_ms']*1e3 or float('nan'):8.1f} us"
          f"  loop {row.get('torch_loop_ms', float('nan'))*1e3:9.1f} us  bmm {row.get('torch_bmm_ms', float('nan'))*1e3:9.1f} us",
          flush=True)


def run_prefill_lora(res, pool, table, ranks, dtype, dev, bw, tokens, nseg, rank=None, nrot=3, loop=True):
    cfg = pool.cfg
    d = cfg.hidden_size
    N = len(ranks)
    esize = torch.tensor([], dtype=dtype).element_size()
    meta = table.meta[:, 0, TARGET_MODULES.index("q_proj")]
    base, extra = divmod(tokens, nseg)
    lens = [base + (1 if i < extra else 0) for i in range(nseg)]
    sets, roof_bytes, flops = [], 0, 0
    cand = [i for i in range(N) if rank is None or ranks[i] == rank]
    for k in range(nrot):
        ids = [cand[(k * nseg + i) % len(cand)] for i in range(nseg)]
        R = max(ranks[i] for i in ids)
        b = LoraBatch.build(lens, ids, R, dev)
        x = torch.randn(tokens, d, dtype=dtype, device=dev)
        y = torch.randn(tokens, d, dtype=dtype, device=dev)
        sets.append((b, x, y))
        roof_bytes = max(roof_bytes, lora_bytes(tokens, d, d, R, [ranks[i] for i in set(ids)], esize, pool.weight_bytes))
        flops = max(flops, sum(4 * n * d * ranks[i] for n, i in zip(lens, ids)))

    def tri(b, x, y):
        v = shrink(tlora, x, table, meta, b)
        expand(tlora, y, v, table, meta, b)

    t_tri = bench(tri, sets)
    t_graph = graph_ms(tri, sets)
    # cuBLAS: the same FLOPs as one adapter with contiguous weights (rank = mean rank, 8-aligned)
    r_eq = max(8, int(round(flops / (4 * tokens * d) / 8)) * 8)
    At = torch.randn(d, r_eq, dtype=dtype, device=dev) / 64
    Bt = torch.randn(r_eq, d, dtype=dtype, device=dev) / 8
    csets = [(s[1], s[2]) for s in sets]
    t_cub = bench(lambda x, y: torch.addmm(y, torch.mm(x, At), Bt, alpha=2.0, out=y), csets)
    t_cub_graph = graph_ms(lambda x, y: torch.addmm(y, torch.mm(x, At), Bt, alpha=2.0, out=y), csets)
    row = {"kind": "prefill_lora", "tokens": tokens, "segments": nseg, "rank": rank or "mixed", "ms": t_tri,
           "roof_ms": roof_bytes / bw * 1e3, "cublas_ms": t_cub, "cublas_rank": r_eq, "flops": flops}
    row["frac_roof"] = row["roof_ms"] / t_tri
    row["vs_cublas"] = t_tri / t_cub
    row["graph_ms"], row["cublas_graph_ms"] = t_graph, t_cub_graph
    if t_graph and t_cub_graph:
        row["vs_cublas_graph"] = t_graph / t_cub_graph
    row["tflops"] = flops / (t_tri * 1e-3) / 1e12
    if loop and nseg <= 64:
        row["torch_loop_ms"] = bench(lambda b, x, y: expand(ref, y, shrink(ref, x, table, meta, b), table, meta, b),
                                     sets[:1], warmup=2, rep=20)
    res.append(row)
    print(f"prefill_lora T={tokens:5d} seg={nseg:4d} r={str(rank or 'mix'):>4}: {t_tri*1e3:8.1f} us  roof {row['roof_ms']*1e3:7.1f} us "
          f"({100*row['frac_roof']:5.1f}%)  cuBLAS(r={r_eq}) {t_cub*1e3:7.1f} us  x{row['vs_cublas']:.2f}  "
          f"loop {row.get('torch_loop_ms', float('nan'))*1e3:9.1f} us  graph {(t_graph or float('nan'))*1e3:7.1f} us "
          f"vs cuBLAS graph {(t_cub_graph or float('nan'))*1e3:7.1f} us", flush=True)


def run_fused_lora(res, pool, table, ranks, dtype, dev, tokens, lens, distinct, grouped=False, nrot=3):
    """q/k/v LoRA as three shrink+expand pairs vs one pair over a module grid axis (what the model
    runs): eager (host launch cost included, as in a prefill step) and from a CUDA graph."""
    d = pool.cfg.hidden_size
    N = len(ranks)
    i0 = TARGET_MODULES.index("q_proj")
    meta3 = table.meta[:, 0, i0:i0 + 3]
    metas = [table.meta[:, 0, i0 + j] for j in range(3)]
    sets = []
    for k in range(nrot):
        ids = [(k * distinct + i % distinct) % N for i in range(len(lens))]
        if grouped:
            ids.sort()
        b = LoraBatch.build(lens, ids, max(ranks[i] for i in ids), dev, grouped=grouped)
        sets.append((b, torch.randn(tokens, d, dtype=dtype, device=dev), torch.randn(tokens, 3 * d, dtype=dtype, device=dev)))

    def separate(b, x, y):
        for j, m in enumerate(metas):
            v = shrink(tlora, x, table, m, b)
            expand(tlora, y[:, j * d:(j + 1) * d], v, table, m, b)

    def fused(b, x, y):
        v = shrink(tlora, x, table, meta3, b)
        expand(tlora, y, v, table, meta3, b, (d, d, d))

    b, x, y = sets[0]
    y1, y2 = y.clone(), y.clone()
    separate(b, x, y1)
    fused(b, x, y2)
    err = rel(y2.float() - y.float(), y1.float() - y.float())
    row = {"kind": "fused_lora", "tokens": tokens, "segments": len(lens), "distinct": distinct, "grouped": grouped,
           "separate_ms": bench(separate, sets), "fused_ms": bench(fused, sets),
           "separate_graph_ms": graph_ms(separate, sets), "fused_graph_ms": graph_ms(fused, sets), "rel_err": err}
    res.append(row)
    g = lambda v: float("nan") if v is None else v * 1e3  # noqa: E731
    print(f"fused_lora qkv T={tokens:5d} seg={len(lens):4d} distinct={distinct:4d}{' grouped' if grouped else ''}: "
          f"eager 3 launches {row['separate_ms']*1e3:8.1f} us, fused {row['fused_ms']*1e3:8.1f} us; graph "
          f"{g(row['separate_graph_ms']):8.1f} vs {g(row['fused_graph_ms']):8.1f} us (rel err {err:.1e})", flush=True)


def build_attn_pool(cfg, seqs, ctx, q_len, dtype, dev, block=16):
    L2 = 2 * cfg.num_layers
    nb = -(-ctx // block)
    pool = UnifiedPool(cfg, seqs * nb * L2 + 1, block, dtype, dev)
    pool.data.normal_()
    bt = torch.tensor(pool.alloc(seqs * nb * L2, "kv"), dtype=torch.int32).view(seqs, nb, L2)
    # shuffle page order so sequences are not contiguous in memory (as in a real pool)
    perm = torch.randperm(bt.numel(), generator=torch.Generator().manual_seed(1))
    bt = bt.view(-1)[perm].view(seqs, nb, L2)
    indptr = torch.arange(seqs + 1, dtype=torch.int32) * q_len
    tp = torch.stack([bt[s, p // block] for s in range(seqs) for p in range(ctx - q_len, ctx)])
    to = torch.tensor([(p % block) for _ in range(seqs) for p in range(ctx - q_len, ctx)], dtype=torch.int32)
    batch = AttnBatch(bt.to(dev), indptr.to(dev), torch.full((seqs,), ctx, dtype=torch.int32, device=dev),
                      tp.to(dev), to.to(dev), q_len, ctx, [(s * q_len, (s + 1) * q_len, ctx) for s in range(seqs)])
    return pool, batch


def run_decode_attn(res, cfg, dtype, dev, bw, seqs, ctx, nrot=2):
    esize = torch.tensor([], dtype=dtype).element_size()
    Hq, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pools = [build_attn_pool(cfg, seqs, ctx, 1, dtype, dev) for _ in range(nrot)]
    sets = [(p.kv_view(), b, torch.randn(seqs, Hq, D, dtype=dtype, device=dev)) for p, b in pools]
    scale = D ** -0.5
    t = bench(lambda kv, b, q: tatt.paged_attention(q, kv, 0, b, scale), sets)
    tg = graph_ms(lambda kv, b, q: tatt.paged_attention(q, kv, 0, b, scale), sets)
    nbytes = seqs * ctx * Hkv * D * 2 * esize + 2 * seqs * Hq * D * esize
    row = {"kind": "decode_attn", "model": "gqa" if Hkv != Hq else "mha", "seqs": seqs, "ctx": ctx, "ms": t,
           "graph_ms": tg, "roof_ms": nbytes / bw * 1e3, "bytes": nbytes}
    row["frac_roof"] = row["roof_ms"] / t
    if tg:
        row["graph_frac_roof"] = row["roof_ms"] / tg
    # SDPA over contiguous (unpaged) K/V of the same size, as a reference point
    try:
        k = torch.randn(seqs, Hkv, ctx, D, dtype=dtype, device=dev)
        v = torch.randn_like(k)
        q = torch.randn(seqs, Hq, 1, D, dtype=dtype, device=dev)
        row["sdpa_ms"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, scale=scale, enable_gqa=Hkv != Hq))
        del k, v
    except Exception as e:  # noqa: BLE001
        row["sdpa_err"] = repr(e)[:200]
    res.append(row)
    del pools, sets
    empty_cache()
    print(f"decode_attn {row['model']} S={seqs:4d} ctx={ctx}: {t*1e3:8.1f} us  roof {row['roof_ms']*1e3:8.1f} us "
          f"({100*row['frac_roof']:5.1f}%)  graph {(tg or float('nan'))*1e3:8.1f} us  "
          f"sdpa(contiguous) {row.get('sdpa_ms', float('nan'))*1e3:8.1f} us", flush=True)


def run_prefill_attn(res, cfg, dtype, dev, seqs, q_len, nrot=2):
    Hq, D = cfg.num_heads, cfg.head_dim
    pools = [build_attn_pool(cfg, seqs, q_len, q_len, dtype, dev) for _ in range(nrot)]
    sets = [(p.kv_view(), b, torch.randn(seqs * q_len, Hq, D, dtype=dtype, device=dev)) for p, b in pools]
    scale = D ** -0.5
    t = bench(lambda kv, b, q: tatt.paged_attention(q, kv, 0, b, scale), sets)
    flops = seqs * 4 * Hq * D * q_len * q_len / 2   # causal
    row = {"kind": "prefill_attn", "model": "gqa" if cfg.num_kv_heads != Hq else "mha", "seqs": seqs,
           "q_len": q_len, "ms": t, "tflops": flops / (t * 1e-3) / 1e12}
    row["graph_ms"] = graph_ms(lambda kv, b, q: tatt.paged_attention(q, kv, 0, b, scale), sets)
    q = torch.randn(seqs, Hq, q_len, D, dtype=dtype, device=dev)
    k = torch.randn(seqs, cfg.num_kv_heads, q_len, D, dtype=dtype, device=dev)
    v = torch.randn_like(k)
    row["sdpa_ms"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scale, enable_gqa=cfg.num_kv_heads != Hq))
    res.append(row)
    del pools, sets
    empty_cache()
    print(f"prefill_attn {row['model']} S={seqs} q={q_len}: {t*1e3:8.1f} us  {row['tflops']:6.1f} TFLOP/s  "
          f"sdpa(contiguous, causal) {row['sdpa_ms']*1e3:8.1f} us", flush=True)


def _lora_cases(pool, table, ranks, dtype, dev, kind):
    """Headline inputs for tuning: (name, meta list, [(batch, x, ys, vs)] rotated sets)."""
    d = pool.cfg.hidden_size
    N = len(ranks)
    metas = [table.meta[:, 0, TARGET_MODULES.index(m)] for m in ATTN_MODULES]
    out = []
    if kind == "decode":
        specs = [("T256x256", [1] * 256, 256), ("T64x64", [1] * 64, 64)] if not SMOKE else [("T6x6", [1] * 6, 6)]
    elif kind == "grouped":
        specs = [("G256x16", [1] * 256, 16), ("G256x64", [1] * 256, 64), ("G64x4", [1] * 64, 4)] if not SMOKE \
            else [("G6x2", [1] * 6, 2)]
    else:
        metas = metas[:1]
        r64 = [i for i in range(N) if ranks[i] == 64]
        specs = [("T4096 r64", [4096], [r64]), ("T512 r64", [512], [r64]), ("T4096 64seg", [64] * 64, 64),
                 ("T4096 8seg", [512] * 8, 8), ("T64 r64", [64], [r64]), ("T1024 4seg", [256] * 4, 4)]
        if SMOKE:
            specs = [("T40 r64", [40], [r64]), ("T40 4seg", [10] * 4, 4)]
    for name, lens, nd in specs:
        sets = []
        for k in range(3):
            if isinstance(nd, list):
                ids = [nd[0][k % len(nd[0])]] * len(lens)
            else:
                ids = [(k * nd + i % nd) % N for i in range(len(lens))]
            if kind == "grouped":
                ids.sort()
            b = LoraBatch.build(lens, ids, max(ranks[i] for i in ids), dev, grouped=kind == "grouped")
            T = sum(lens)
            x = torch.randn(T, d, dtype=dtype, device=dev)
            ys = [torch.randn(T, d, dtype=dtype, device=dev) for _ in metas]
            vs = [shrink(ref, x, table, m, b) for m in metas]
            sets.append((b, x, ys, vs))
        out.append((name, metas, sets))
    return out


def _pick(results):
    """Variant with the smallest geometric mean of time / best time over the cases."""
    import math
    cases = {c for _, c, _ in results}
    best = {c: min(ms for _, cc, ms in results if cc == c) for c in cases}
    score = {}
    for key, c, ms in results:
        score.setdefault(key, []).append(math.log(ms / best[c]))
    full = {k: v for k, v in score.items() if len(v) == len(cases)}
    return min(full, key=lambda k: sum(full[k]) / len(full[k])) if full else None


def run_sweep(res, pool, table, ranks, dtype, dev, bw, only):
    """Autotune: time tile variants on the headline cases (CUDA-graph replay over rotated inputs,
    so no launch overhead and no warm L2), keep the best per kernel (geometric mean over cases),
    check the kept one against the reference, and leave it in TUNE for the main tables."""
    import copy
    chosen = {}

    def tune(family, table_, key_fn, variants, cases, check):
        results = []
        default = copy.deepcopy(table_[family])
        if SMOKE:
            variants = variants[:2]
        for var in variants:
            cfg = dict(default)
            cfg.update(var)
            table_[family] = cfg
            for cname, fn, sets in cases:
                try:
                    ms = graph_bench(fn, sets)
                except Exception as e:  # noqa: BLE001
                    print(f"sweep {family} {var} {cname}: FAILED {repr(e)[:200]}", flush=True)
                    continue
                results.append((key_fn(var), cname, ms))
                res.append({"kind": "sweep", "what": family, "case": cname, "cfg": var, "ms": ms})
                print(f"sweep {family:14s} {cname:12s} {str(var):75s} {ms*1e3:8.1f} us", flush=True)
        best = _pick(results)
        cfg = dict(default)
        if best is not None:
            cfg.update(dict(best))
        table_[family] = cfg
        err = check()
        if not err < 2e-2:
            print(f"sweep {family}: best {cfg} FAILED the reference check (err {err}); keeping {default}", flush=True)
            table_[family] = default
        chosen[family] = {"cfg": table_[family], "check_rel_err": err}
        print(f"sweep {family}: chose {table_[family]} (rel err vs reference {err:.2e})", flush=True)

    key = lambda var: tuple(sorted(var.items()))  # noqa: E731
    for kind in ("decode", "grouped"):
        if pool is None or "decode_lora" not in only:
            break
        cases = _lora_cases(pool, table, ranks, dtype, dev, kind)
        sh = [(c, (lambda metas: lambda b, x, ys, vs: [shrink(tlora, x, table, m, b) for m in metas])(m), s)
              for c, m, s in cases]
        ex = [(c, (lambda metas: lambda b, x, ys, vs: [expand(tlora, y, v, table, m, b)
                                                       for m, y, v in zip(metas, ys, vs)])(m), s) for c, m, s in cases]

        def check_lora(kind):
            def chk():
                c, metas, sets = cases[0]
                b, x, ys, vs = sets[0]
                if kind == "shrink":
                    return rel(shrink(tlora, x, table, metas[0], b), vs[0])
                # a fresh y: the timed runs accumulated thousands of deltas into ys (fp16 rounding of
                # a large y would swamp the delta being checked)
                y0 = torch.randn_like(ys[0])
                y1, y2 = y0.clone(), y0.clone()
                expand(tlora, y1, vs[0], table, metas[0], b)
                expand(ref, y2, vs[0], table, metas[0], b)
                return rel(y1.float() - y0.float(), y2.float() - y0.float())
            return chk
        if kind == "grouped":
            tune("shrink_grouped", tlora.TUNE, key,
                 [dict(BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk, num_warps=nw) for bm, br, bk, nw in
                  [(16, 16, 256, 4), (16, 32, 256, 4), (16, 16, 512, 4), (32, 16, 256, 4), (16, 64, 128, 4),
                   (32, 32, 256, 8), (16, 16, 128, 2)]],
                 sh, check_lora("shrink"))
            tune("expand_grouped", tlora.TUNE, key,
                 [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=nw) for bm, bn, nw in
                  [(16, 128, 4), (16, 64, 4), (16, 256, 4), (32, 128, 4), (16, 128, 2), (32, 64, 4), (64, 128, 8)]],
                 ex, check_lora("expand"))
            continue
        # PIPE: the loop's loads pipelined PIPE - 1 tiles ahead through shared memory (1: not)
        tune("shrink_decode", tlora.TUNE, key,
             [dict(BLOCK_R=br, BLOCK_K=bk, num_warps=nw, num_stages=3, PIPE=p) for br, bk, nw, p in
              [(16, 512, 4, 3), (8, 1024, 4, 3), (8, 512, 4, 3), (8, 512, 2, 3), (16, 1024, 4, 3), (8, 2048, 8, 3),
               (16, 256, 4, 3), (8, 1024, 8, 3), (8, 1024, 4, 1), (8, 1024, 4, 4), (8, 256, 1, 3), (8, 256, 1, 1)]],
             sh, check_lora("shrink"))
        tune("expand_decode", tlora.TUNE, key,
             [dict(BLOCK_R=br, BLOCK_N=bn, num_warps=nw, num_stages=3, TILE_FIRST=tf) for br, bn, nw, tf in
              [(16, 512, 4, False), (16, 256, 2, False), (16, 1024, 4, False), (8, 512, 4, False), (16, 256, 4, False),
               (32, 256, 4, False), (8, 256, 2, False), (16, 256, 2, True), (8, 128, 1, True), (8, 256, 1, True)]],
             ex, check_lora("expand"))
    if pool is not None and "prefill_lora" in only:
        cases = _lora_cases(pool, table, ranks, dtype, dev, "prefill")
        sh = [(c, (lambda metas: lambda b, x, ys, vs: shrink(tlora, x, table, metas[0], b))(m), s)
              for c, m, s in cases]
        ex = [(c, (lambda metas: lambda b, x, ys, vs: expand(tlora, ys[0], vs[0], table, metas[0], b))(m), s) for c, m, s in cases]

        def check_pre(kind):
            def chk():
                errs = []
                for c, metas, sets in cases:
                    b, x, ys, vs = sets[0]
                    if kind == "shrink":
                        errs.append(rel(shrink(tlora, x, table, metas[0], b), vs[0]))
                    else:
                        y0 = torch.randn_like(ys[0])   # fresh, as above
                        y1, y2 = y0.clone(), y0.clone()
                        expand(tlora, y1, vs[0], table, metas[0], b)
                        expand(ref, y2, vs[0], table, metas[0], b)
                        errs.append(rel(y1.float() - y0.float(), y2.float() - y0.float()))
                return max(errs)
            return chk
        tune("shrink_seg", tlora.TUNE, key,
             [dict(BLOCK_M=bm, BLOCK_K=bk, num_warps=nw, num_stages=ns, SPLIT_K=sk) for bm, bk, nw, ns, sk in
              [(None, 128, 4, 4, None), (None, 64, 4, 4, None), (None, 128, 4, 3, None), (64, 128, 4, 4, None),
               (32, 128, 4, 4, None), (16, 128, 4, 4, None), (None, 128, 4, 4, 1), (None, 256, 8, 3, None),
               (64, 64, 4, 6, None), (None, 128, 8, 4, None)]],
             sh, check_pre("shrink"))
        tune("expand_seg", tlora.TUNE, key,
             [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns) for bm, bn, nw, ns in
              [(None, 128, 4, 3), (64, 128, 4, 3), (64, 64, 4, 3), (32, 128, 4, 3), (64, 256, 8, 3), (128, 128, 8, 3),
               (32, 256, 4, 3), (64, 128, 4, 2)]],
             ex, check_pre("expand"))
    if "decode_attn" in only:
        cases, refs = [], []
        for name, cfg, S in [("mha S64", LLAMA7B, 64), ("gqa S64", GQA, 64), ("mha S8", LLAMA7B, 8)]:
            sets = []
            for _ in range(2):
                p, b = build_attn_pool(cfg, 2 if SMOKE else S, 40 if SMOKE else 1024, 1, dtype, dev)
                sets.append((p.kv_view(), b, torch.randn(b.context_lens.numel(), cfg.num_heads, cfg.head_dim, dtype=dtype, device=dev)))
            cases.append((name, lambda kv, b, q: tatt.paged_attention(q, kv, 0, b, 0.088), sets))

        def chk_dec():
            return max(rel(tatt.paged_attention(q, kv, 0, b, 0.088), ref.paged_attention(q, kv, 0, b, 0.088))
                       for _, _, sets in cases for kv, b, q in sets[:1])
        tune("decode", tatt.TUNE, key,
             [dict(BLOCK_N=bn, num_warps=nw, num_stages=ns, min_programs_per_sm=mp) for bn, nw, ns, mp in
              [(64, 4, 3, 2), (32, 4, 3, 2), (128, 4, 3, 2), (64, 8, 3, 2), (64, 4, 4, 2), (64, 4, 3, 4), (128, 8, 3, 4),
               (64, 4, 2, 1)]],
             cases, chk_dec)
        del cases
        empty_cache()
    if "prefill_attn" in only:
        cases = []
        for name, cfg, S, n in [("mha 4x1024", LLAMA7B, 4, 1024), ("gqa 4x1024", GQA, 4, 1024), ("mha 1x4096", LLAMA7B, 1, 4096)]:
            if SMOKE:
                S, n = 2, 24
            p, b = build_attn_pool(cfg, S, n, n, dtype, dev)
            sets = [(p.kv_view(), b, torch.randn(S * n, cfg.num_heads, cfg.head_dim, dtype=dtype, device=dev))]
            cases.append((name, lambda kv, b, q: tatt.paged_attention(q, kv, 0, b, 0.088), sets))

        def chk_pre():
            kv, b, q = cases[0][2][0]
            return rel(tatt.paged_attention(q, kv, 0, b, 0.088), ref.paged_attention(q, kv, 0, b, 0.088))
        tune("prefill", tatt.TUNE, key,
             [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns) for bm, bn, nw, ns in
              [(64, 64, 4, 2), (128, 64, 8, 2), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3),
               (64, 128, 4, 2), (128, 64, 8, 3)]],
             cases, chk_pre)
        del cases
        empty_cache()
    res.append({"kind": "tuned", "chosen": chosen})
    out = pathlib.Path(TUNE_OUT) if TUNE_OUT else None
    if out is not None:
        prev = json.loads(out.read_text()) if out.exists() else {}
        prev.setdefault("lora", {}).update({k: v for k, v in tlora.TUNE.items()})
        prev.setdefault("attention", {}).update({k: v for k, v in tatt.TUNE.items()})
        out.write_text(json.dumps(prev, indent=1))
    return chosen


def rel(out, want):
    out, want = out.double(), want.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - want).norm() / want.norm().clamp_min(1e-30)).item()


def markdown(meta, res) -> str:
    out = [f"# Kernel benchmark ({meta['device']}, {meta['date']})", "",
           f"commit `{meta['commit']}`, command `{meta['command']}`, dtype {meta['dtype']}, "
           f"adapter rows {meta.get('adapter_dtype', 'auto')}, "
           f"torch {meta['torch']}, triton {meta['triton']}; copy bandwidth {meta['copy_bw_GBs']:.0f} GB/s "
           f"(read+write), bf16/fp16 8192^3 matmul {meta['mm_tflops']:.0f} TFLOP/s.", ""]
    f = lambda v: "" if v is None else (f"{v*1e3:.1f}" if isinstance(v, float) else str(v))  # noqa: E731
    dl = [r for r in res if r["kind"] == "decode_lora"]
    if dl:
        out += ["## Decode LoRA (shrink+expand, q/k/v/o 4096->4096, mixed ranks 8..128), us", "",
                "| tokens | distinct adapters | triton | roofline | % roofline | shrink | expand | graph replay | graph % roofline "
                "| grouped graph | grouped % roofline | torch loop | padded bmm |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in dl:
            out.append(f"| {r['tokens']} | {r['distinct']} | {f(r['ms'])} | {f(r['roof_ms'])} | {100*r['frac_roof']:.0f}% | "
                       f"{f(r['shrink_ms'])} | {f(r['expand_ms'])} | {f(r.get('graph_ms'))} | "
                       f"{(str(round(100 * r['graph_frac_roof'])) + '%') if r.get('graph_frac_roof') else ''} | "
                       f"{f(r.get('grouped_graph_ms'))} | "
                       f"{(str(round(100 * r['grouped_frac_roof'])) + '%') if r.get('grouped_frac_roof') else ''} | "
                       f"{f(r.get('torch_loop_ms'))} | "
                       f"{f(r.get('torch_bmm_ms'))} |")
        out.append("")
    pl = [r for r in res if r["kind"] == "prefill_lora"]
    if pl:
        out += ["## Prefill LoRA (shrink+expand, q_proj 4096->4096), us", "",
                "| tokens | segments | rank | triton | TFLOP/s | roofline | % roofline | cuBLAS same FLOPs | triton/cuBLAS | "
                "triton graph | cuBLAS graph | graph ratio | torch loop |",
                "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in pl:
            out.append(f"| {r['tokens']} | {r['segments']} | {r['rank']} | {f(r['ms'])} | {r['tflops']:.1f} | {f(r['roof_ms'])} | "
                       f"{100*r['frac_roof']:.0f}% | {f(r['cublas_ms'])} (r={r['cublas_rank']}) | {r['vs_cublas']:.2f}x | "
                       f"{f(r.get('graph_ms'))} | {f(r.get('cublas_graph_ms'))} | "
                       f"{(str(round(r['vs_cublas_graph'], 2)) + 'x') if r.get('vs_cublas_graph') else ''} | "
                       f"{f(r.get('torch_loop_ms'))} |")
        out.append("")
    da = [r for r in res if r["kind"] == "decode_attn"]
    if da:
        out += ["## Decode paged attention (32 q heads x 128), us", "",
                "| model | seqs | context | triton | roofline | % roofline | triton graph | graph % roofline | SDPA, contiguous K/V |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in da:
            out.append(f"| {r['model']} | {r['seqs']} | {r['ctx']} | {f(r['ms'])} | {f(r['roof_ms'])} | "
                       f"{100*r['frac_roof']:.0f}% | {f(r.get('graph_ms'))} | "
                       f"{(str(round(100 * r['graph_frac_roof'])) + '%') if r.get('graph_frac_roof') else ''} | {f(r.get('sdpa_ms'))} |")
        out.append("")
    pa = [r for r in res if r["kind"] == "prefill_attn"]
    if pa:
        out += ["## Prefill paged attention (causal), us", "",
                "| model | seqs | q_len | triton | TFLOP/s | triton graph | SDPA, contiguous, causal |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for r in pa:
            out.append(f"| {r['model']} | {r['seqs']} | {r['q_len']} | {f(r['ms'])} | {r['tflops']:.1f} | "
                       f"{f(r.get('graph_ms'))} | {f(r['sdpa_ms'])} |")
        out.append("")
    fl = [r for r in res if r["kind"] == "fused_lora"]
    if fl:
        out += ["## q/k/v LoRA: three shrink+expand pairs vs one launch pair over a module axis, us", "",
                "| tokens | segments | distinct adapters | schedule | eager, 3 pairs | eager, fused | graph, 3 pairs | "
                "graph, fused | rel err |", "|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
        for r in fl:
            sched = "grouped" if r["grouped"] else ("decode" if r["segments"] == r["tokens"] else "segments")
            out.append(f"| {r['tokens']} | {r['segments']} | {r['distinct']} | {sched} | {f(r['separate_ms'])} | "
                       f"{f(r['fused_ms'])} | {f(r.get('separate_graph_ms'))} | {f(r.get('fused_graph_ms'))} | "
                       f"{r['rel_err']:.1e} |")
        out.append("")
    tuned = [r for r in res if r["kind"] == "tuned"]
    if tuned:
        out += ["## Tiles used (picked by --sweep on this device, checked against the reference)", ""]
        for t in tuned:
            for fam, v in t["chosen"].items():
                out.append(f"- {fam}: `{v['cfg']}` (rel err {v['check_rel_err']:.1e})")
        out.append("")
    return "\n".join(out)


def guarded(fn, *args, **kw):
    try:
        fn(*args, **kw)
    except Exception as e:  # noqa: BLE001
        import traceback
        traceback.print_exc()
        print(f"FAILED {fn.__name__} {args[6:] if len(args) > 6 else ''} {kw}: {e!r}"[:500], flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--adapters", type=int, default=1000, help="adapters resident in the pool")
    ap.add_argument("--quick", action="store_true", help="fewer sizes")
    ap.add_argument("--only", default="", help="comma list of: decode_lora,prefill_lora,fused_lora,decode_attn,prefill_attn")
    ap.add_argument("--sweep", action="store_true", help="also time tile variants of the headline cases")
    ap.add_argument("--prefill-cases", default="",
                    help="prefill LoRA cases instead of the default list: tokens:segments:rank,... (rank 0: mixed)")
    ap.add_argument("--adapter-dtype", default="auto", choices=["auto", "int8", "int4"],
                    help="adapter rows in the pool: the model's dtype, or int8 / int4 with a scale per row")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    a = ap.parse_args(argv)
    global SMOKE, LLAMA7B, GQA, TUNE_OUT
    dev = torch.device("cuda")
    if a.cpu_smoke:
        SMOKE = True
        dev = torch.device("cpu")
        LLAMA7B = ModelConfig(hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4, num_kv_heads=4,
                              head_dim=16, vocab_size=64)
        GQA = ModelConfig(hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4, num_kv_heads=2,
                          head_dim=16, vocab_size=64)
    dtype = getattr(torch, a.dtype)
    only = set(a.only.split(",")) if a.only else {"decode_lora", "prefill_lora", "fused_lora", "decode_attn",
                                                  "prefill_attn"}
    t0 = time.time()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=pathlib.Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    bw = copy_bandwidth(dev)
    mm = mm_rate(dev, dtype)
    meta = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke)", "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": os.environ.get("BENCH_COMMIT", commit), "command": " ".join(["python", "benchmarks/bench_kernels.py"] + (argv or sys.argv[1:])),
            "dtype": a.dtype, "adapter_dtype": a.adapter_dtype, "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "copy_bw_GBs": bw / 1e9, "mm_tflops": mm / 1e12}
    print(f"{meta['device']}: copy {bw/1e9:.0f} GB/s, matmul {mm/1e12:.0f} TFLOP/s", flush=True)
    res = []
    outdir = pathlib.Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)
    TUNE_OUT = str(outdir / "tune.json") if a.sweep else None

    def dump():
        (outdir / "kernels.json").write_text(json.dumps({"meta": meta, "results": res}, indent=1))
        (outdir / "kernels.md").write_text(markdown(meta, res))

    if {"decode_lora", "prefill_lora", "fused_lora"} & only:
        pool, table, ranks = build_lora_pool(LLAMA7B, a.adapters, dtype, dev, adapter_dtype=QUANTIZED.get(a.adapter_dtype))
        print(f"lora pool: {a.adapters} adapters, {pool.adapter_pages} pages, built in {time.time()-t0:.1f}s", flush=True)
        if a.sweep:
            guarded(run_sweep, res, pool, table, ranks, dtype, dev, bw, only & {"decode_lora", "prefill_lora"})
            dump()
        if "decode_lora" in only:
            dec = [(1, 1), (16, 16), (64, 64), (256, 256), (256, 16), (256, 1)] if a.quick else \
                  [(1, 1), (8, 8), (32, 32), (64, 64), (128, 128), (256, 256), (256, 128), (256, 64), (256, 16), (256, 1)]
            if SMOKE:
                dec = [(4, 4), (4, 1)]
            for T, n in dec:
                guarded(run_decode_lora, res, pool, table, ranks, dtype, dev, bw, T, n, baselines=T in (1, 4, 64, 256))
                dump()
        if "prefill_lora" in only:
            pre = [(8, 1, 64), (64, 1, 64), (512, 1, 64), (4096, 1, 16), (4096, 1, 64), (4096, 1, 128),
                   (512, 8, None), (1024, 4, None), (4096, 8, None), (4096, 64, None), (4096, 1000, None)]
            if a.quick:
                pre = [p for p in pre if p[0] in (512, 4096)]
            if a.prefill_cases:
                pre = [(int(t), int(n), int(r) or None) for t, n, r in (c.split(":") for c in a.prefill_cases.split(","))]
            if SMOKE:
                pre = [(40, 1, 16), (40, 4, None)]
            for T, n, r in pre:
                guarded(run_prefill_lora, res, pool, table, ranks, dtype, dev, bw, T, n, rank=r)
                dump()
        if "fused_lora" in only:
            cases = [(1, [1], 1, False), (32, [1] * 32, 32, False), (256, [1] * 256, 256, False),
                     (256, [1] * 256, 16, True), (512, [128] * 4, 4, False), (4096, [512] * 8, 8, False)]
            if SMOKE:
                cases = [(4, [1] * 4, 4, False), (6, [1] * 6, 2, True), (40, [10] * 4, 4, False)]
            for T, lens, n, grouped in cases:
                guarded(run_fused_lora, res, pool, table, ranks, dtype, dev, T, lens, n, grouped=grouped)
                dump()
        del pool, table
        empty_cache()
    if a.sweep:
        guarded(run_sweep, res, None, None, None, dtype, dev, bw, only & {"decode_attn", "prefill_attn"})
        dump()
    if "decode_attn" in only:
        for cfg, S in ([(LLAMA7B, 64), (GQA, 64)] if a.quick else
                       [(LLAMA7B, 1), (LLAMA7B, 16), (LLAMA7B, 64), (LLAMA7B, 256), (GQA, 64), (GQA, 256)]):
            guarded(run_decode_attn, res, cfg, dtype, dev, bw, min(S, 2) if SMOKE else S, 40 if SMOKE else 1024)
            dump()
    if "prefill_attn" in only:
        for cfg, S, n in [(LLAMA7B, 4, 1024), (LLAMA7B, 1, 4096), (GQA, 4, 1024)]:
            guarded(run_prefill_attn, res, cfg, dtype, dev, min(S, 2) if SMOKE else S, 24 if SMOKE else n)
            dump()
    res.append({"kind": "tune_final", "lora": tlora.TUNE, "attention": tatt.TUNE})
    dump()
    print()
    print(markdown(meta, res))
    print(f"total {time.time()-t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
