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
from server.pool import AdapterTable, UnifiedPool, stage_adapter  # noqa: E402

RANKS = (8, 16, 32, 64, 128)
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
LLAMA7B = ModelConfig(hidden_size=4096, intermediate_size=11008, num_layers=1, num_heads=32, num_kv_heads=32,
                      head_dim=128, vocab_size=32000)
GQA = ModelConfig(hidden_size=4096, intermediate_size=14336, num_layers=1, num_heads=32, num_kv_heads=8,
                  head_dim=128, vocab_size=32000)


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
def build_lora_pool(cfg, n_adapters, dtype, dev, modules=ATTN_MODULES, variants=2):
    g = torch.Generator().manual_seed(0)
    probe = UnifiedPool(cfg, 1, 16, dtype, "cpu")
    staged = {}
    for r in RANKS:
        for k in range(variants):
            w = {}
            for m in modules:
                d_in, d_out = cfg.module_dims(m)
                w[(0, m)] = (torch.randn(r, d_in, generator=g) / d_in ** 0.5, torch.randn(d_out, r, generator=g) / r ** 0.5)
            staged[(r, k)] = stage_adapter(LoraWeights(f"r{r}v{k}", r, 2 * r, 2.0, list(modules), False, w), probe)
    need = sum(staged[(RANKS[i % len(RANKS)], (i // len(RANKS)) % variants)].num_pages for i in range(n_adapters))
    pool = UnifiedPool(cfg, need + 8, 16, dtype, dev)
    table = AdapterTable(pool, n_adapters)
    ranks = []
    for i in range(n_adapters):
        r = RANKS[i % len(RANKS)]
        table.insert(staged[(r, (i // len(RANKS)) % variants)])
        ranks.append(r)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return pool, table, ranks


def graph_ms(fn):
    """Median ms of a CUDA-graph replay of fn (no launch overhead); None where capture fails."""
    if SMOKE:
        return None
    try:
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return bench(lambda: g.replay())
    except Exception as e:  # noqa: BLE001
        print("graph capture failed:", repr(e)[:200], flush=True)
        return None


def lora_bytes(T, d_in, d_out, R, distinct_ranks, esize):
    """Fewest bytes: each distinct adapter's A and B once, x read, v written+read, y read+written."""
    w = sum(r * (d_in + d_out) for r in distinct_ranks) * esize
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
        roof_bytes = max(roof_bytes, 4 * lora_bytes(tokens, d, d, R, [ranks[i] for i in ids], esize))

    def tri(b, x, ys):
        for meta, y in zip(metas, ys):
            v = tlora.lora_shrink(x, pool.flat, table.rows, meta, b)
            tlora.lora_expand(y, v, pool.flat, table.rows, meta, table.scaling, b)

    t_tri = bench(tri, sets)
    row = {"kind": "decode_lora", "tokens": tokens, "distinct": distinct, "ms": t_tri,
           "roof_ms": roof_bytes / bw * 1e3, "bytes": roof_bytes}
    row["frac_roof"] = row["roof_ms"] / t_tri
    # split: shrink alone and expand alone (first rotation set, all 4 modules)
    b, x, ys = sets[0]
    vs = [tlora.lora_shrink(x, pool.flat, table.rows, m, b) for m in metas]
    row["shrink_ms"] = bench(lambda b, x: [tlora.lora_shrink(x, pool.flat, table.rows, m, b) for m in metas],
                             [(s[0], s[1]) for s in sets])
    row["expand_ms"] = bench(lambda b, ys: [tlora.lora_expand(y, v, pool.flat, table.rows, m, table.scaling, b)
                                            for m, y, v in zip(metas, ys, vs)], [(s[0], s[2]) for s in sets])
    # CUDA graph of the 8 launches (what a graph-captured decode step would see)
    row["graph_ms"] = graph_ms(lambda: tri(*sets[0]))
    if row["graph_ms"]:
        row["graph_frac_roof"] = row["roof_ms"] / row["graph_ms"]
    if baselines:
        row["torch_loop_ms"] = bench(lambda b, x, ys: [ref.lora_expand(y, ref.lora_shrink(x, pool.flat, table.rows, m, b),
                                                                       pool.flat, table.rows, m, table.scaling, b)
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
            a0, b0, r = (int(z) for z in meta[s])
            A[j, :r] = ref.gather_rows(pool.flat, table.rows, a0, r, d)
            Bt[j, :r] = ref.gather_rows(pool.flat, table.rows, b0, r, d)
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
        roof_bytes = max(roof_bytes, lora_bytes(tokens, d, d, R, [ranks[i] for i in set(ids)], esize))
        flops = max(flops, sum(4 * n * d * ranks[i] for n, i in zip(lens, ids)))

    def tri(b, x, y):
        v = tlora.lora_shrink(x, pool.flat, table.rows, meta, b)
        tlora.lora_expand(y, v, pool.flat, table.rows, meta, table.scaling, b)

    t_tri = bench(tri, sets)
    t_graph = graph_ms(lambda: tri(*sets[0]))
    # cuBLAS: the same FLOPs as one adapter with contiguous weights (rank = mean rank, 8-aligned)
    r_eq = max(8, int(round(flops / (4 * tokens * d) / 8)) * 8)
    At = torch.randn(d, r_eq, dtype=dtype, device=dev) / 64
    Bt = torch.randn(r_eq, d, dtype=dtype, device=dev) / 8
    csets = [(s[1], s[2]) for s in sets]
    t_cub = bench(lambda x, y: torch.addmm(y, torch.mm(x, At), Bt, alpha=2.0, out=y), csets)
    t_cub_graph = graph_ms(lambda: torch.addmm(sets[0][2], torch.mm(sets[0][1], At), Bt, alpha=2.0, out=sets[0][2]))
    row = {"kind": "prefill_lora", "tokens": tokens, "segments": nseg, "rank": rank or "mixed", "ms": t_tri,
           "roof_ms": roof_bytes / bw * 1e3, "cublas_ms": t_cub, "cublas_rank": r_eq, "flops": flops}
    row["frac_roof"] = row["roof_ms"] / t_tri
    row["vs_cublas"] = t_tri / t_cub
    row["graph_ms"], row["cublas_graph_ms"] = t_graph, t_cub_graph
    if t_graph and t_cub_graph:
        row["vs_cublas_graph"] = t_graph / t_cub_graph
    row["tflops"] = flops / (t_tri * 1e-3) / 1e12
    if loop and nseg <= 64:
        row["torch_loop_ms"] = bench(lambda b, x, y: ref.lora_expand(y, ref.lora_shrink(x, pool.flat, table.rows, meta, b),
                                                                     pool.flat, table.rows, meta, table.scaling, b),
                                     sets[:1], warmup=2, rep=20)
    res.append(row)
    print(f"prefill_lora T={tokens:5d} seg={nseg:4d} r={str(rank or 'mix'):>4}: {t_tri*1e3:8.1f} us  roof {row['roof_ms']*1e3:7.1f} us "
          f"({100*row['frac_roof']:5.1f}%)  cuBLAS(r={r_eq}) {t_cub*1e3:7.1f} us  x{row['vs_cublas']:.2f}  "
          f"loop {row.get('torch_loop_ms', float('nan'))*1e3:9.1f} us  graph {(t_graph or float('nan'))*1e3:7.1f} us "
          f"vs cuBLAS graph {(t_cub_graph or float('nan'))*1e3:7.1f} us", flush=True)


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
    nbytes = seqs * ctx * Hkv * D * 2 * esize + 2 * seqs * Hq * D * esize
    row = {"kind": "decode_attn", "model": "gqa" if Hkv != Hq else "mha", "seqs": seqs, "ctx": ctx, "ms": t,
           "roof_ms": nbytes / bw * 1e3, "bytes": nbytes}
    row["frac_roof"] = row["roof_ms"] / t
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
          f"({100*row['frac_roof']:5.1f}%)  sdpa(contiguous) {row.get('sdpa_ms', float('nan'))*1e3:8.1f} us", flush=True)


def run_prefill_attn(res, cfg, dtype, dev, seqs, q_len, nrot=2):
    Hq, D = cfg.num_heads, cfg.head_dim
    pools = [build_attn_pool(cfg, seqs, q_len, q_len, dtype, dev) for _ in range(nrot)]
    sets = [(p.kv_view(), b, torch.randn(seqs * q_len, Hq, D, dtype=dtype, device=dev)) for p, b in pools]
    scale = D ** -0.5
    t = bench(lambda kv, b, q: tatt.paged_attention(q, kv, 0, b, scale), sets)
    flops = seqs * 4 * Hq * D * q_len * q_len / 2   # causal
    row = {"kind": "prefill_attn", "model": "gqa" if cfg.num_kv_heads != Hq else "mha", "seqs": seqs,
           "q_len": q_len, "ms": t, "tflops": flops / (t * 1e-3) / 1e12}
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


def run_sweep(res, pool, table, ranks, dtype, dev, bw, only):
    """Tile variants on the headline cases; prints each and leaves TUNE as it found it."""
    import copy
    saved_l, saved_a = copy.deepcopy(tlora.TUNE), copy.deepcopy(tatt.TUNE)
    d = pool.cfg.hidden_size
    metas = [table.meta[:, 0, TARGET_MODULES.index(m)] for m in ATTN_MODULES]

    def rec(name, cfg, ms, extra=""):
        res.append({"kind": "sweep", "what": name, "cfg": {k: v for k, v in cfg.items()}, "ms": ms})
        print(f"sweep {name:22s} {str(cfg):70s} {ms*1e3:9.1f} us {extra}", flush=True)

    def try_(name, cfg, fn, extra=None):
        try:
            ms = fn()
            rec(name, cfg, ms, extra(ms) if extra else "")
        except Exception as e:  # noqa: BLE001
            print(f"sweep {name} {cfg} FAILED {repr(e)[:300]}", flush=True)

    if "decode_lora" in only and pool is not None:
        sets = []
        for k in range(3):
            ids = [(k * 256 + i) % len(ranks) for i in range(256)]
            b = LoraBatch.build([1] * 256, ids, max(ranks[i] for i in ids), dev)
            x = torch.randn(256, d, dtype=dtype, device=dev)
            ys = [torch.randn(256, d, dtype=dtype, device=dev) for _ in metas]
            vs = [tlora.lora_shrink(x, pool.flat, table.rows, m, b) for m in metas]
            sets.append((b, x, ys, vs))
        esize = 2
        wbytes = 256 * sum(ranks[:5]) / 5 * d * esize * 4   # one matrix per module, mixed ranks
        for BR, BK, nw, ns in [(16, 512, 4, 3), (16, 512, 4, 1), (16, 512, 4, 4), (16, 1024, 4, 3), (16, 1024, 8, 3),
                               (16, 512, 8, 3), (8, 1024, 4, 3), (32, 512, 4, 3), (8, 512, 2, 3), (16, 256, 2, 3)]:
            tlora.TUNE["shrink_decode"] = dict(BLOCK_R=BR, BLOCK_K=BK, num_warps=nw, num_stages=ns)
            try_("shrink_decode", tlora.TUNE["shrink_decode"],
                 lambda: bench(lambda b, x, ys, vs: [tlora.lora_shrink(x, pool.flat, table.rows, m, b) for m in metas], sets),
                 lambda ms: f"~{wbytes / (ms * 1e-3) / bw * 100:.0f}% of copy bw")
        tlora.TUNE["shrink_decode"] = saved_l["shrink_decode"]
        for BR, BN, nw, ns in [(16, 512, 4, 3), (16, 512, 4, 1), (16, 512, 4, 4), (16, 1024, 4, 3), (16, 512, 8, 3),
                               (32, 512, 4, 3), (8, 1024, 4, 3), (16, 256, 2, 3), (8, 512, 2, 3), (32, 1024, 8, 3)]:
            tlora.TUNE["expand_decode"] = dict(BLOCK_R=BR, BLOCK_N=BN, num_warps=nw, num_stages=ns)
            try_("expand_decode", tlora.TUNE["expand_decode"],
                 lambda: bench(lambda b, x, ys, vs: [tlora.lora_expand(y, v, pool.flat, table.rows, m, table.scaling, b)
                                                     for m, y, v in zip(metas, ys, vs)], sets),
                 lambda ms: f"~{wbytes / (ms * 1e-3) / bw * 100:.0f}% of copy bw")
        tlora.TUNE["expand_decode"] = saved_l["expand_decode"]
    if "prefill_lora" in only and pool is not None:
        meta = metas[0]
        for label, lens, pick in [("r64x4096", [4096], [i for i in range(len(ranks)) if ranks[i] == 64][:1]),
                                  ("mix64seg", [64] * 64, list(range(64)))]:
            R = max(ranks[i] for i in pick)
            b = LoraBatch.build(lens, pick, R, dev)
            sets = [(torch.randn(4096, d, dtype=dtype, device=dev), torch.randn(4096, d, dtype=dtype, device=dev))
                    for _ in range(2)]
            v = tlora.lora_shrink(sets[0][0], pool.flat, table.rows, meta, b)
            for BM, BK, nw, ns in [(None, 128, 4, 4), (16, 128, 4, 4), (32, 128, 4, 4), (16, 256, 4, 3), (32, 256, 4, 3),
                                   (16, 128, 2, 4), (32, 128, 8, 4), (64, 128, 4, 4), (32, 128, 4, 5), (32, 64, 4, 6)]:
                tlora.TUNE["shrink_seg"] = dict(BLOCK_M=BM, BLOCK_K=BK, num_warps=nw, num_stages=ns)
                try_(f"shrink_seg {label}", tlora.TUNE["shrink_seg"],
                     lambda: bench(lambda x, y: tlora.lora_shrink(x, pool.flat, table.rows, meta, b), sets))
            tlora.TUNE["shrink_seg"] = saved_l["shrink_seg"]
            for BM, BN, nw, ns in [(None, 128, 4, 3), (64, 128, 4, 3), (64, 64, 4, 3), (64, 256, 8, 3), (32, 256, 4, 3),
                                   (32, 128, 4, 3), (64, 128, 8, 3), (64, 128, 4, 1), (16, 256, 4, 3)]:
                tlora.TUNE["expand_seg"] = dict(BLOCK_M=BM, BLOCK_N=BN, num_warps=nw, num_stages=ns)
                try_(f"expand_seg {label}", tlora.TUNE["expand_seg"],
                     lambda: bench(lambda x, y: tlora.lora_expand(y, v, pool.flat, table.rows, meta, table.scaling, b), sets))
            tlora.TUNE["expand_seg"] = saved_l["expand_seg"]
    if "decode_attn" in only:
        for cfg, S in [(LLAMA7B, 64), (GQA, 64)]:
            p, b = build_attn_pool(cfg, S, 1024, 1, dtype, dev)
            kv = p.kv_view()
            q = torch.randn(S, cfg.num_heads, cfg.head_dim, dtype=dtype, device=dev)
            nbytes = S * 1024 * cfg.num_kv_heads * cfg.head_dim * 2 * 2
            for BN, nw, ns, mps in [(64, 4, 3, 2), (32, 4, 3, 2), (128, 4, 3, 2), (64, 8, 3, 2), (128, 8, 2, 2),
                                    (64, 4, 4, 2), (16, 4, 3, 2), (64, 4, 3, 8), (128, 4, 4, 8)]:
                tatt.TUNE["decode"] = dict(BLOCK_N=BN, num_warps=nw, num_stages=ns, min_programs_per_sm=mps)
                try_(f"attn_decode {'gqa' if cfg is GQA else 'mha'}", tatt.TUNE["decode"],
                     lambda: bench(lambda: tatt.paged_attention(q, kv, 0, b, 0.088)),
                     lambda ms: f"{nbytes / (ms * 1e-3) / bw * 100:.0f}% of roofline")
            del p, kv
            empty_cache()
        tatt.TUNE["decode"] = saved_a["decode"]
    if "prefill_attn" in only:
        p, b = build_attn_pool(LLAMA7B, 4, 1024, 1024, dtype, dev)
        kv = p.kv_view()
        q = torch.randn(4096, 32, 128, dtype=dtype, device=dev)
        fl = 4 * 4 * 32 * 128 * 1024 * 1024 / 2
        for BM, BN, nw, ns in [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3),
                               (128, 64, 4, 3), (128, 32, 8, 3)]:
            tatt.TUNE["prefill"] = dict(BLOCK_M=BM, BLOCK_N=BN, num_warps=nw, num_stages=ns)
            try_("attn_prefill mha", tatt.TUNE["prefill"], lambda: bench(lambda: tatt.paged_attention(q, kv, 0, b, 0.088)),
                 lambda ms: f"{fl / (ms * 1e-3) / 1e12:.0f} TFLOP/s")
        tatt.TUNE["prefill"] = saved_a["prefill"]
        del p, kv
        empty_cache()


def markdown(meta, res) -> str:
    out = [f"# Kernel benchmark ({meta['device']}, {meta['date']})", "",
           f"commit `{meta['commit']}`, command `{meta['command']}`, dtype {meta['dtype']}, "
           f"torch {meta['torch']}, triton {meta['triton']}; copy bandwidth {meta['copy_bw_GBs']:.0f} GB/s "
           f"(read+write), bf16/fp16 8192^3 matmul {meta['mm_tflops']:.0f} TFLOP/s.", ""]
    f = lambda v: "" if v is None else (f"{v*1e3:.1f}" if isinstance(v, float) else str(v))  # noqa: E731
    dl = [r for r in res if r["kind"] == "decode_lora"]
    if dl:
        out += ["## Decode LoRA (shrink+expand, q/k/v/o 4096->4096, mixed ranks 8..128), us", "",
                "| tokens | distinct adapters | triton | roofline | % roofline | shrink | expand | graph replay | graph % roofline | torch loop | padded bmm |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in dl:
            out.append(f"| {r['tokens']} | {r['distinct']} | {f(r['ms'])} | {f(r['roof_ms'])} | {100*r['frac_roof']:.0f}% | "
                       f"{f(r['shrink_ms'])} | {f(r['expand_ms'])} | {f(r.get('graph_ms'))} | "
                       f"{(str(round(100 * r['graph_frac_roof'])) + '%') if r.get('graph_frac_roof') else ''} | {f(r.get('torch_loop_ms'))} | "
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
                "| model | seqs | context | triton | roofline | % roofline | SDPA, contiguous K/V |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for r in da:
            out.append(f"| {r['model']} | {r['seqs']} | {r['ctx']} | {f(r['ms'])} | {f(r['roof_ms'])} | "
                       f"{100*r['frac_roof']:.0f}% | {f(r.get('sdpa_ms'))} |")
        out.append("")
    pa = [r for r in res if r["kind"] == "prefill_attn"]
    if pa:
        out += ["## Prefill paged attention (causal), us", "",
                "| model | seqs | q_len | triton | TFLOP/s | SDPA, contiguous, causal |", "|---|---:|---:|---:|---:|---:|"]
        for r in pa:
            out.append(f"| {r['model']} | {r['seqs']} | {r['q_len']} | {f(r['ms'])} | {r['tflops']:.1f} | {f(r['sdpa_ms'])} |")
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
    ap.add_argument("--only", default="", help="comma list of: decode_lora,prefill_lora,decode_attn,prefill_attn")
    ap.add_argument("--sweep", action="store_true", help="also time tile variants of the headline cases")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    a = ap.parse_args(argv)
    global SMOKE, LLAMA7B, GQA
    dev = torch.device("cuda")
    if a.cpu_smoke:
        SMOKE = True
        dev = torch.device("cpu")
        LLAMA7B = ModelConfig(hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4, num_kv_heads=4,
                              head_dim=16, vocab_size=64)
        GQA = ModelConfig(hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4, num_kv_heads=2,
                          head_dim=16, vocab_size=64)
    dtype = getattr(torch, a.dtype)
    only = set(a.only.split(",")) if a.only else {"decode_lora", "prefill_lora", "decode_attn", "prefill_attn"}
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
            "dtype": a.dtype, "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "copy_bw_GBs": bw / 1e9, "mm_tflops": mm / 1e12}
    print(f"{meta['device']}: copy {bw/1e9:.0f} GB/s, matmul {mm/1e12:.0f} TFLOP/s", flush=True)
    res = []
    outdir = pathlib.Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)

    def dump():
        (outdir / "kernels.json").write_text(json.dumps({"meta": meta, "results": res}, indent=1))
        (outdir / "kernels.md").write_text(markdown(meta, res))

    if {"decode_lora", "prefill_lora"} & only:
        pool, table, ranks = build_lora_pool(LLAMA7B, a.adapters, dtype, dev)
        print(f"lora pool: {a.adapters} adapters, {pool.adapter_pages} pages, built in {time.time()-t0:.1f}s", flush=True)
        if "decode_lora" in only:
            dec = [(1, 1), (16, 16), (64, 64), (256, 256), (256, 16), (256, 1)] if a.quick else \
                  [(1, 1), (8, 8), (32, 32), (64, 64), (128, 128), (256, 256), (256, 64), (256, 16), (256, 1)]
            if SMOKE:
                dec = [(4, 4), (4, 1)]
            for T, n in dec:
                guarded(run_decode_lora, res, pool, table, ranks, dtype, dev, bw, T, n, baselines=T in (1, 4, 64, 256))
                dump()
        if "prefill_lora" in only:
            pre = [(8, 1, 64), (64, 1, 64), (512, 1, 64), (4096, 1, 16), (4096, 1, 64), (4096, 1, 128),
                   (512, 8, None), (4096, 8, None), (4096, 64, None), (4096, 1000, None)]
            if a.quick:
                pre = [p for p in pre if p[0] in (512, 4096)]
            if SMOKE:
                pre = [(40, 1, 16), (40, 4, None)]
            for T, n, r in pre:
                guarded(run_prefill_lora, res, pool, table, ranks, dtype, dev, bw, T, n, rank=r)
                dump()
        if a.sweep and not SMOKE:
            guarded(run_sweep, res, pool, table, ranks, dtype, dev, bw, only & {"decode_lora", "prefill_lora"})
            dump()
        del pool, table
        empty_cache()
    if "decode_attn" in only:
        for cfg, S in ([(LLAMA7B, 64), (GQA, 64)] if a.quick else
                       [(LLAMA7B, 1), (LLAMA7B, 16), (LLAMA7B, 64), (LLAMA7B, 256), (GQA, 64), (GQA, 256)]):
            guarded(run_decode_attn, res, cfg, dtype, dev, bw, min(S, 2) if SMOKE else S, 40 if SMOKE else 1024)
            dump()
    if "prefill_attn" in only:
        for cfg, S, n in [(LLAMA7B, 4, 1024), (LLAMA7B, 1, 4096), (GQA, 4, 1024)]:
            guarded(run_prefill_attn, res, cfg, dtype, dev, min(S, 2), 24 if SMOKE else n)
            dump()
    if a.sweep and not SMOKE:
        guarded(run_sweep, res, None, None, None, dtype, dev, bw, only & {"decode_attn", "prefill_attn"})
    dump()
    print()
    print(markdown(meta, res))
    print(f"total {time.time()-t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
