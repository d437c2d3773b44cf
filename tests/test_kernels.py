"""Triton kernels vs the pure-torch references (kernels/reference.py).

On a CPU machine the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set below
before triton is imported) at tiny shapes; on a CUDA machine the same small tests run compiled
on the GPU, and the ``gpu`` tests add Llama-7B shapes (and a GQA shape) in fp16 and bf16.
Pools and tables are built with the real server/pool.py classes, so layouts are the real ones.
"""
from __future__ import annotations

import os
import struct

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from kernels import reference as ref  # noqa: E402
from kernels import triton_attention as tatt  # noqa: E402
from kernels import triton_gemv as tgemv  # noqa: E402
from kernels import triton_lora as tlora  # noqa: E402
from kernels import triton_norm_rope as tnr  # noqa: E402
from kernels.batch import AttnBatch, LoraBatch  # noqa: E402
from server.config import TARGET_MODULES, ModelConfig  # noqa: E402
from server.lora import LoraWeights  # noqa: E402
from server.pool import INT4, AdapterTable, UnifiedPool, stage_adapter  # noqa: E402

DEV = "cuda" if HAS_CUDA else "cpu"
# adapter rows as stored in the pool: the model's dtype, or int8 / int4 with a scale per row
ADAPTER_DTYPES = pytest.mark.parametrize("adapter_dtype", [None, torch.int8, INT4],
                                         ids=["rows-model-dtype", "rows-int8", "rows-int4"])
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")

# -------------------------------------------------------------------------------------------------
# builders (also used by benchmarks/bench_kernels.py)
# -------------------------------------------------------------------------------------------------
TINY = ModelConfig(hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=16, vocab_size=128)


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    out, want = out.double(), want.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - want).norm() / want.norm().clamp_min(1e-30)).item()


def poison(n: int, dtype) -> None:
    """Leave a freed block of NaNs where the next output of n elements is likely to be allocated
    (the CUDA caching allocator hands it straight back), so unwritten outputs show up as NaN."""
    t = torch.full((max(n, 1),), float("nan"), dtype=dtype, device=DEV)
    del t


def random_adapter(cfg: ModelConfig, name: str, rank: int, modules, layers=None, gen=None) -> LoraWeights:
    layers = range(cfg.num_layers) if layers is None else layers
    w = {}
    for layer in layers:
        for m in modules:
            d_in, d_out = cfg.module_dims(m)
            a = torch.randn(rank, d_in, generator=gen) / d_in ** 0.5
            b = torch.randn(d_out, rank, generator=gen) / rank ** 0.5
            w[(layer, m)] = (a, b)
    alpha = 2.0 * rank
    return LoraWeights(name, rank, alpha, alpha / rank, list(modules), False, w)


def build_table(cfg: ModelConfig, ranks, modules_per, dtype, device, block_tokens=4, extra_pages=0,
                gen=None, adapter_dtype=None):
    """A pool + table holding one adapter per rank; returns (pool, table, [slot ids])."""
    weights = [random_adapter(cfg, f"a{i}", r, mods, gen=gen) for i, (r, mods) in enumerate(zip(ranks, modules_per))]
    probe = UnifiedPool(cfg, 1, block_tokens, dtype, "cpu", adapter_dtype)
    staged = [stage_adapter(w, probe) for w in weights]
    pages = sum(s.num_pages for s in staged) + extra_pages + 2   # + the garbage page + the pool's scratch page
    pool = UnifiedPool(cfg, pages, block_tokens, dtype, device, adapter_dtype)
    # a first page of garbage keeps offset 0 from being a valid row by accident
    pool.alloc(1, "kv")
    pool.data.normal_()
    table = AdapterTable(pool, max(len(weights), 1) + 1)
    slots = [table.insert(s).slot for s in staged]
    return pool, table, slots


def build_attn(pool: UnifiedPool, q_lens, ctx_lens, device, gen=None):
    """Allocate KV pages for each sequence and an AttnBatch whose new tokens are the last q_lens."""
    cfg, B = pool.cfg, pool.block_tokens
    L2 = 2 * cfg.num_layers
    nbs = [-(-n // B) for n in ctx_lens]
    maxb = max(nbs)
    bt = torch.zeros(len(ctx_lens), maxb, L2, dtype=torch.int32)
    for s, nb in enumerate(nbs):
        for b in range(nb):
            bt[s, b] = torch.tensor(pool.alloc(L2, "kv"), dtype=torch.int32)
    # unused table entries point at a garbage page: the kernels must not read them
    for s, nb in enumerate(nbs):
        bt[s, nb:] = pool.num_pages - 1
    indptr, tp, to, host = [0], [], [], []
    for s, (m, n) in enumerate(zip(q_lens, ctx_lens)):
        host.append((indptr[-1], indptr[-1] + m, n))
        indptr.append(indptr[-1] + m)
        for p in range(n - m, n):
            tp.append(bt[s, p // B])
            to.append(p % B)
    t = lambda v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    return AttnBatch(bt.to(device), t(indptr), t(list(ctx_lens)),
                     torch.stack(tp).to(device) if tp else torch.zeros(0, L2, dtype=torch.int32, device=device),
                     t(to), max(q_lens), max(ctx_lens), host)


# -------------------------------------------------------------------------------------------------
# LoRA
# -------------------------------------------------------------------------------------------------
def _lora_setup(cfg, dtype, seq_lens, pick, ranks, modules_per, gen, block_tokens, grouped, adapter_dtype=None):
    """A pool and table with one adapter per rank, and the batch of segments picking them (-1: base)."""
    pool, table, slots = build_table(cfg, ranks, modules_per, dtype, DEV, block_tokens=block_tokens, gen=gen,
                                     adapter_dtype=adapter_dtype)
    seg_slots = [-1 if p < 0 else slots[p] for p in pick]
    max_rank = max((table.max_rank[s] for s in seg_slots if s >= 0), default=0)
    return pool, table, LoraBatch.build(seq_lens, seg_slots, max_rank, DEV, grouped=grouped)


def _check_lora(cfg, dtype, seq_lens, pick, ranks, modules_per, check_modules, layer, tol, gen, block_tokens=4,
                grouped=False, adapter_dtype=None):
    """Each module's shrink, expand and delta against the reference; adapter_dtype=torch.int8
    stores the rows quantized (the reference then reads the same int8 rows and scales)."""
    pool, table, batch = _lora_setup(cfg, dtype, seq_lens, pick, ranks, modules_per, gen, block_tokens, grouped,
                                     adapter_dtype)
    F, R, S = table.flat, table.rows, table.row_scale
    T = sum(seq_lens)
    for m in check_modules:
        mi = TARGET_MODULES.index(m)
        d_in, d_out = cfg.module_dims(m)
        meta = table.meta[:, layer, mi]
        x = torch.randn(T, d_in, generator=gen).to(DEV, dtype)
        poison(T * batch.max_rank, dtype)
        v = tlora.lora_shrink(x, F, R, meta, batch, S)
        v_ref = ref.lora_shrink(x, F, R, meta, batch, S)
        assert v.shape == v_ref.shape and v.dtype == v_ref.dtype
        assert torch.isfinite(v).all(), f"{m}: unwritten or NaN shrink output"
        assert rel_err(v, v_ref) < tol, (m, rel_err(v, v_ref))
        # zeros past each token's rank and for base tokens, exactly
        assert torch.equal(v[v_ref == 0], v_ref[v_ref == 0])
        # expand into a column slice of a wider tensor; the columns around it must not move
        big = torch.randn(T, d_out + 24, generator=gen).to(DEV, dtype)
        want = big.clone()
        y = big[:, 8:8 + d_out]
        tlora.lora_expand(y, v_ref, F, R, meta, table.scaling, batch, row_scale=S)
        ref.lora_expand(want[:, 8:8 + d_out], v_ref, F, R, meta, table.scaling, batch, row_scale=S)
        assert torch.equal(big[:, :8], want[:, :8]) and torch.equal(big[:, 8 + d_out:], want[:, 8 + d_out:])
        # the LoRA delta alone, against the fp32 reference delta
        d_tri = torch.zeros(T, d_out, dtype=torch.float32, device=DEV)
        tlora.lora_expand(d_tri, v_ref.float(), F, R, meta, table.scaling, batch, row_scale=S)
        d_ref = torch.zeros(T, d_out, dtype=torch.float32, device=DEV)
        ref.lora_expand(d_ref, v_ref.float(), F, R, meta, table.scaling, batch, row_scale=S)
        if d_ref.abs().sum() > 0:
            assert rel_err(d_tri, d_ref) < tol, (m, rel_err(d_tri, d_ref))
        assert rel_err(y, want[:, 8:8 + d_out]) < tol, (m, rel_err(y, want[:, 8:8 + d_out]))


@ADAPTER_DTYPES
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("decode", [True, False])
def test_lora_mixed_ranks(dtype, decode, adapter_dtype):
    gen = torch.Generator().manual_seed(1 + decode + (dtype == torch.float16) * 2)
    ranks = [8, 16, 32, 12]
    mods = [("q_proj", "gate_proj", "down_proj"), ("q_proj", "down_proj", "gate_proj", "v_proj"),
            ("q_proj", "gate_proj", "down_proj"), ("q_proj",)]   # the last one skips gate/down: rank 0
    if decode:
        lens = [1] * 9
    else:
        lens = [5, 1, 19, 3, 9, 2, 1, 17, 4]       # uneven segments, decode tokens mixed in
    pick = [0, -1, 1, 2, 3, 1, -1, 0, 2]
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    _check_lora(TINY, dtype, lens, pick, ranks, mods, ("q_proj", "gate_proj", "down_proj"), 1, tol, gen,
                adapter_dtype=adapter_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int4_segments_split_by_nibble_match_the_reference(dtype, monkeypatch):
    """I4_SPLIT (the int4 segment kernels' dots by nibble plane: x's even and odd columns in the
    shrink, y's in the expand) gives the reference's result over uneven segments of mixed ranks."""
    for family in ("shrink_seg", "expand_seg"):
        monkeypatch.setitem(tlora.TUNE, family, {**tlora.TUNE[family], "I4_SPLIT": True})
    launches = _spy_launches(monkeypatch, "_shrink_seg_kernel")
    gen = torch.Generator().manual_seed(7 + (dtype == torch.float16))
    mods = [("q_proj", "gate_proj", "down_proj"), ("q_proj", "down_proj", "v_proj"), ("down_proj",)]
    _check_lora(TINY, dtype, [5, 1, 19, 3, 9, 2, 17], [0, -1, 1, 2, 1, -1, 0], [8, 16, 32], mods,
                ("q_proj", "gate_proj", "down_proj"), 1, 1e-5 if dtype == torch.float32 else 2e-3, gen,
                adapter_dtype=INT4)
    assert launches


@ADAPTER_DTYPES
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("order", ["sorted", "interleaved"])
def test_lora_grouped_decode(dtype, order, adapter_dtype):
    """Grouped decode: 37 tokens over 3 token tiles; sorted by slot (what the engine sends) and
    interleaved (every tile holds every adapter); base tokens and a rank-0 module mixed in."""
    gen = torch.Generator().manual_seed(11 + (order == "sorted") + 2 * (dtype == torch.float16))
    ranks = [8, 16, 32, 12]
    mods = [("q_proj", "gate_proj", "down_proj"), ("q_proj", "down_proj", "gate_proj", "v_proj"),
            ("q_proj", "gate_proj", "down_proj"), ("q_proj",)]
    pick = [(i * 7) % 5 - 1 for i in range(37)]
    if order == "sorted":
        pick.sort()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    _check_lora(TINY, dtype, [1] * len(pick), pick, ranks, mods, ("q_proj", "gate_proj", "down_proj"), 1, tol, gen,
                grouped=True, adapter_dtype=adapter_dtype)


@ADAPTER_DTYPES
@pytest.mark.parametrize("split", [1, 2, 4])
def test_lora_grouped_decode_split_k(split, monkeypatch, adapter_dtype):
    """The grouped shrink with d_in split over programs (partial sums added into an fp32 buffer),
    forced to 1, 2 and 4 splits; down_proj's d_in (96) leaves a short last split."""
    monkeypatch.setitem(tlora.TUNE["shrink_grouped"], "SPLIT_K", split)
    gen = torch.Generator().manual_seed(50 + split)
    ranks = [8, 16, 32, 12]
    mods = [("q_proj", "gate_proj", "down_proj"), ("q_proj", "down_proj", "gate_proj", "v_proj"),
            ("q_proj", "gate_proj", "down_proj"), ("q_proj",)]
    pick = sorted((i * 7) % 5 - 1 for i in range(37))
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        _check_lora(TINY, dtype, [1] * len(pick), pick, ranks, mods, ("q_proj", "gate_proj", "down_proj"), 1,
                    tol, gen, grouped=True, adapter_dtype=adapter_dtype)


def _check_lora_fused(cfg, dtype, seq_lens, pick, ranks, modules_per, groups, layer, tol, gen, block_tokens=4,
                      grouped=False, adapter_dtype=None):
    """Modules sharing an input in one launch (meta [slots, M, 4]) against one reference call per
    module: shrink output per module, and the expand into adjacent column ranges of one tensor."""
    pool, table, batch = _lora_setup(cfg, dtype, seq_lens, pick, ranks, modules_per, gen, block_tokens, grouped,
                                     adapter_dtype)
    F, R, S = table.flat, table.rows, table.row_scale
    T = sum(seq_lens)
    for group in groups:
        idx = [TARGET_MODULES.index(m) for m in group]
        assert idx == list(range(idx[0], idx[0] + len(idx))), "fused modules are adjacent in the table"
        meta = table.meta[:, layer, idx[0]:idx[0] + len(idx)]
        d_in = cfg.module_dims(group[0])[0]
        widths = tuple(cfg.module_dims(m)[1] for m in group)
        x = torch.randn(T, d_in, generator=gen).to(DEV, dtype)
        poison(T * len(group) * batch.max_rank, dtype)
        v = tlora.lora_shrink(x, F, R, meta, batch, S)
        assert v.shape == (T, len(group), batch.max_rank) and torch.isfinite(v).all()
        for j, m in enumerate(group):
            v_ref = ref.lora_shrink(x, F, R, meta[:, j], batch, S)
            assert rel_err(v[:, j], v_ref) < tol, (m, rel_err(v[:, j], v_ref))
            assert torch.equal(v[:, j][v_ref == 0], v_ref[v_ref == 0]), m
        # expand into a column slice of a wider tensor (the fused GEMM output), 8 spare columns each side
        W = sum(widths)
        big = torch.randn(T, W + 16, generator=gen).to(DEV, dtype)
        want, orig = big.clone(), big.clone()
        tlora.lora_expand(big[:, 8:8 + W], v, F, R, meta, table.scaling, batch, widths, S)
        off = 8
        for j, w in enumerate(widths):
            ref.lora_expand(want[:, off:off + w], v[:, j], F, R, meta[:, j], table.scaling, batch, row_scale=S)
            off += w
        assert torch.equal(big[:, :8], want[:, :8]) and torch.equal(big[:, 8 + W:], want[:, 8 + W:])
        assert rel_err(big, want) < tol, (group, rel_err(big, want))
        # the reference's own multi-module form is the per-module calls
        ref.lora_expand(orig[:, 8:8 + W], v, F, R, meta, table.scaling, batch, widths, S)
        assert torch.equal(orig, want)
        assert torch.equal(ref.lora_shrink(x, F, R, meta, batch, S),
                           torch.stack([ref.lora_shrink(x, F, R, meta[:, j], batch, S)
                                        for j in range(len(group))], dim=1))


@ADAPTER_DTYPES
@pytest.mark.parametrize("schedule", ["decode", "grouped", "prefill"])
def test_lora_fused_modules(schedule, adapter_dtype):
    """q/k/v (GQA: k and v narrower than q) and gate/up in one launch each; one adapter targets
    only q and v (k's rank is 0 in its meta), base tokens mixed in."""
    gen = torch.Generator().manual_seed(31 + len(schedule))
    ranks = [8, 16, 24]
    allm = tuple(TARGET_MODULES)
    mods = [allm, ("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "up_proj")]
    if schedule == "prefill":
        lens, pick = [5, 1, 19, 3, 9, 2], [0, -1, 1, 2, 1, 0]
    else:
        pick = [(i * 5) % 4 - 1 for i in range(21)]
        if schedule == "grouped":
            pick.sort()
        lens = [1] * len(pick)
    _check_lora_fused(TINY, torch.float16, lens, pick, ranks, mods, [("q_proj", "k_proj", "v_proj"),
                      ("gate_proj", "up_proj")], 1, 2e-3, gen, grouped=schedule == "grouped",
                      adapter_dtype=adapter_dtype)


@pytest.mark.parametrize("grouped", [False, True])
def test_lora_mixed_step_parts(grouped):
    """A step of prefills then decodes runs as two parts (segment schedule, then the decode
    schedule on the decode suffix, grouped when sorted); together they equal the reference on the
    whole batch."""
    gen = torch.Generator().manual_seed(41 + grouped)
    pool, table, slots = build_table(TINY, [8, 16, 24], [tuple(TARGET_MODULES)] * 3, torch.float16, DEV, gen=gen)
    pre_lens, pre_pick = [5, 19, 3], [0, -1, 2]
    dec_pick = sorted([1, 0, 2, 2, -1, 1, 0, 1, 2]) if grouped else [1, 0, 2, 2, -1, 1, 0, 1, 2]
    lens, pick = pre_lens + [1] * len(dec_pick), pre_pick + dec_pick
    seg_slots = [-1 if p < 0 else slots[p] for p in pick]
    batch = LoraBatch.build(lens, seg_slots, 24, DEV, grouped=grouped, decode_from=len(pre_lens))
    parts = batch.split()
    assert [(a, b, q.max_seg_len, q.grouped) for a, b, q in parts] == [(0, 27, 19, False), (27, 36, 1, grouped)]
    i0 = TARGET_MODULES.index("q_proj")
    meta = table.meta[:, 1, i0:i0 + 3]
    widths = tuple(TINY.module_dims(m)[1] for m in ("q_proj", "k_proj", "v_proj"))
    x = torch.randn(36, TINY.hidden_size, generator=gen).to(DEV, torch.float16)
    y = torch.randn(36, sum(widths), generator=gen).to(DEV, torch.float16)
    y0, want = y.clone(), y.clone()
    for t0, t1, part in parts:
        v = tlora.lora_shrink(x[t0:t1], pool.flat, table.rows, meta, part)
        tlora.lora_expand(y[t0:t1], v, pool.flat, table.rows, meta, table.scaling, part, widths)
    ref.lora_expand(want, ref.lora_shrink(x, pool.flat, table.rows, meta, batch), pool.flat, table.rows, meta,
                    table.scaling, batch, widths)
    assert rel_err(y.float() - y0.float(), want.float() - y0.float()) < 5e-3   # the deltas, not y itself
    assert LoraBatch.build([1, 1], [0, 1], 8, DEV, decode_from=1).parts is None   # one-token prompts: one part


@ADAPTER_DTYPES
@pytest.mark.parametrize("split", [2, 3])
def test_lora_split_k(split, adapter_dtype):
    """The segment shrink split over d_in (each split's partial in fp32, the tile's last program
    adds them in split order): one module and q/k/v in one launch, against the reference; the
    same bits on a second run, and every tile counter back at zero."""
    gen = torch.Generator().manual_seed(5 + split)
    saved = dict(tlora.TUNE["shrink_seg"])
    tlora.TUNE["shrink_seg"].update(SPLIT_K=split, BLOCK_K=16)
    try:
        _check_lora(TINY, torch.float16, [6, 1, 19, 3], [0, -1, 1, 2], [8, 16, 40],
                    [("q_proj", "down_proj"), ("q_proj", "down_proj"), ("q_proj",)], ("q_proj", "down_proj"), 0,
                    2e-3, gen, block_tokens=16, adapter_dtype=adapter_dtype)
        qkv = ("q_proj", "k_proj", "v_proj")
        _check_lora_fused(TINY, torch.float16, [5, 17, 1], [1, 0, -1], [16, 40], [qkv, ("q_proj", "v_proj")], [qkv],
                          0, 2e-3, gen, block_tokens=16, adapter_dtype=adapter_dtype)
        pool, table, batch = _lora_setup(TINY, torch.float16, [9, 20], [0, 1], [8, 40], [("q_proj",), ("q_proj",)],
                                         gen, 16, False, adapter_dtype)
        x = torch.randn(29, TINY.hidden_size, generator=gen).to(DEV, torch.float16)
        meta = table.meta[:, 0, TARGET_MODULES.index("q_proj")]
        runs = [tlora.lora_shrink(x, table.flat, table.rows, meta, batch, table.row_scale) for _ in range(2)]
        assert torch.equal(runs[0], runs[1])
        assert int(tlora._COUNTERS[x.device].abs().sum()) == 0
    finally:
        tlora.TUNE["shrink_seg"] = saved


@pytest.mark.parametrize("split", [1, 2])
def test_lora_segment_shrink_rank_tiles(split):
    """The segment shrink with a rank tile (TUNE BLOCK_N) smaller than the ranks: a rank-40
    segment spans three tiles, a rank-8 one leaves two tiles of zeros; with and without split-K."""
    gen = torch.Generator().manual_seed(11 + split)
    saved = dict(tlora.TUNE["shrink_seg"])
    tlora.TUNE["shrink_seg"].update(BLOCK_N=16, SPLIT_K=split, BLOCK_K=16)
    try:
        _check_lora(TINY, torch.float16, [6, 19, 3, 9], [0, 1, -1, 2], [8, 40, 16],
                    [("q_proj", "down_proj"), ("q_proj",), ("q_proj", "down_proj")], ("q_proj", "down_proj"), 0,
                    2e-3, gen, block_tokens=16)
    finally:
        tlora.TUNE["shrink_seg"] = saved


@pytest.mark.parametrize("rule", [0, 1])
def test_lora_segment_shrink_tile_rules(rule, monkeypatch):
    """The segment shrink's token tile and d_in splits as each rule picks them (SEG_RULE 1, the
    default, fills about one program per SM; 0, the earlier rule), against the reference."""
    monkeypatch.setitem(tlora.TUNE, "shrink_seg", {**tlora.TUNE["shrink_seg"], "SEG_RULE": rule, "BLOCK_K": 16})
    _check_lora(TINY, torch.float16, [6, 19, 3, 40], [0, 1, -1, 2], [8, 40, 16],
                [("q_proj", "down_proj"), ("q_proj",), ("q_proj", "down_proj")], ("q_proj", "down_proj"), 0,
                2e-3, torch.Generator().manual_seed(17 + rule), block_tokens=16)


def test_lora_segment_shrink_tile_rule_fills_the_sms():
    """What SEG_RULE 1 picks at Llama-7B's d_in on 132 SMs, where the H200 sweep measured it
    fastest: the largest token tile that leaves 32 tiles, then splits up to ~one program per SM."""
    cfg = {**tlora.TUNE["shrink_seg"], "BLOCK_M": None, "SPLIT_K": None, "SEG_RULE": 1}
    pick = lambda lens, units: tlora._shrink_seg_tiles(cfg, LoraBatch.build(lens, list(range(len(lens))), 8, DEV),  # noqa: E731
                                                        units, 4096, 132)
    assert pick([256] * 4, 2) == (64, 4)      # 4 tiles of 64 x 2 rank tiles, split 4: 128 programs
    assert pick([64] * 64, 2) == (64, 1)      # 128 tiles already
    assert pick([512], 1) == (16, 4)          # one short prompt: 32 tiles of 16, split 4
    assert pick([8], 1) == (16, 16)           # a tiny one: split as far as d_in allows
    cfg["SPLIT_FILL"] = 0.5
    assert pick([256] * 4, 2) == (64, 2)


def test_lora_all_base_and_rank_past_tile():
    """Only base tokens; and a rank past one rank tile (40 > 16/32) with an odd d_in."""
    gen = torch.Generator().manual_seed(7)
    cfg = ModelConfig(hidden_size=40, intermediate_size=72, num_layers=1, num_heads=5, num_kv_heads=1,
                      head_dim=8, vocab_size=64)
    _check_lora(cfg, torch.float32, [1, 1, 1], [-1, 0, -1], [40], [("q_proj", "down_proj")],
                ("q_proj", "down_proj"), 0, 1e-5, gen, block_tokens=16)
    pool, table, slots = build_table(cfg, [8], [("q_proj",)], torch.float32, DEV, block_tokens=16, gen=gen)
    batch = LoraBatch.build([3, 2], [-1, -1], 0, DEV)
    x = torch.randn(5, 40, generator=gen).to(DEV)
    v = tlora.lora_shrink(x, pool.flat, table.rows, table.meta[:, 0, 0], batch)
    assert v.shape == (5, 0)
    y = torch.randn(5, 40, generator=gen).to(DEV)
    y0 = y.clone()
    tlora.lora_expand(y, v, pool.flat, table.rows, table.meta[:, 0, 0], table.scaling, batch)
    assert torch.equal(y, y0)


@pytest.mark.parametrize("small_tiles_from", [1, 10 ** 6])
def test_int8_decode_tiles_at_any_batch_size(small_tiles_from, monkeypatch):
    """int8 rows take one-warp decode tiles from INT8_SMALL_TILES_MIN_T tokens up and the fp16
    tiles below it: both against the reference, with base tokens and rank-0 modules mixed in."""
    monkeypatch.setattr(tlora, "INT8_SMALL_TILES_MIN_T", small_tiles_from)
    _check_decode_mix(90, torch.int8)


def _check_decode_mix(seed: int, adapter_dtype) -> None:
    """13 decode tokens over 4 adapters of mixed ranks, base tokens and a rank-0 module, fp16."""
    ranks = [8, 16, 32, 12]
    mods = [("q_proj", "gate_proj", "down_proj"), ("q_proj", "down_proj", "gate_proj", "v_proj"),
            ("q_proj", "gate_proj", "down_proj"), ("q_proj",)]
    pick = [(i * 7) % 5 - 1 for i in range(13)]
    _check_lora(TINY, torch.float16, [1] * len(pick), pick, ranks, mods, ("q_proj", "gate_proj", "down_proj"), 1,
                2e-3, torch.Generator().manual_seed(seed), adapter_dtype=adapter_dtype)


# decode-schedule variants (TUNE keys of every decode tile family) beside the defaults: the loops'
# loads software-pipelined PIPE - 1 tiles ahead or not at all (PIPE); one token's tiles launched
# together or tokens first (TILE_FIRST); launched as programmatic dependent launches or not (PDL:
# sm_90+ GPUs only; on the CPU and older GPUs the key is ignored)
DECODE_VARIANTS = pytest.mark.parametrize(
    "variant", [{"PIPE": 1, "TILE_FIRST": False}, {"PIPE": 4, "TILE_FIRST": True},
                {"RCLASS": True, "BLOCK_R": 32}, {"PDL": False}, {"PDL": True, "RCLASS": True, "PIPE": 3},
                {"COMPACT": True}, {"COMPACT": True, "PDL": True, "BLOCK_R": 4},
                # int8 rows dequantized in PTX (only on a GPU: the interpreter runs the integer ops)
                {"PTX_DQ": 1, "RCLASS": True}, {"PTX_DQ": 2, "COMPACT": True, "PDL": True, "PIPE": 4},
                {"PTX_DQ": 0},
                # the int8 expand's rows as biased fp32, summed per thread (PTX on a GPU; BLOCK_R 8: TPR 2)
                {"BIAS": True, "RCLASS": True, "PTX_DQ": 1}, {"BIAS": True, "RCLASS": True, "BLOCK_R": 8},
                # ... with BLOCK_R 32 (two groups of 4 tiles a chunk; the int8 default)
                {"BIAS": True, "RCLASS": True, "PTX_DQ": 1, "BLOCK_R": 32},
                # the int8 expand by row chunks (its tiles: test_rows_expand_tiles_match_the_reference)
                {"ROWS": True}],
    ids=["plain", "pipe4-tile-first", "rank-classes", "no-pdl", "pdl-rank-classes", "compact", "compact-pdl-r4",
         "ptx-dq", "ptx-dq-fp16-products", "integer-dq", "biased", "biased-r8", "biased-r32", "rows"])


@pytest.mark.parametrize("n", [1, 2, 4])
def test_biased_fma_ptx_uses_every_operand_once_in_place(n):
    """BIAS's PTX (which the interpreter cannot run) for n rows: it writes the 4 outputs only at its
    end (an output may share a register with an input) and reads every input: each row's bytes, its
    v once per column, and acc once per column for the first row."""
    import re
    asm = tlora._biased_fma_asm(n)
    constraints = tlora._biased_fma_constraints(n).split(",")
    assert constraints == ["=r"] * 4 + ["r"] * (5 * n + 4)
    body = asm.splitlines()
    reads = [int(k) for line in body for k in re.findall(r"\$(\d+)", line.split(",", 1)[-1])]
    writes = [int(m) for line in body for m in re.findall(r"^\s*\S+\s+\$(\d+),", line)]
    assert sorted(writes) == [0, 1, 2, 3] and all(line.startswith("mov.b32 $") for line in body if re.match(r"\S+ \$\d", line))
    assert sorted(set(reads)) == list(range(4, 4 + 5 * n + 4))
    assert all(reads.count(k) == 1 for k in range(4 + n, 4 + 5 * n + 4))     # each v and acc register once
    assert [reads.count(k) for k in range(4, 4 + n)] == [1] * n              # each row's bytes xor-ed once


def _f32(w: int) -> float:
    """The fp32 number of a 32-bit word (subnormals kept)."""
    return struct.unpack("<f", struct.pack("<I", w))[0]


def _word(x: float) -> int:
    """The 32-bit word of x rounded to fp32."""
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _f32_round(x: float) -> float:
    return _f32(_word(x))


def _halves(w: int) -> list[float]:
    """The two fp16 numbers of a 32-bit word, low half first."""
    return [float(x) for x in struct.unpack("<2e", struct.pack("<I", w))]


def _f16x2(pair: list[float]) -> int:
    """Two numbers rounded to fp16, packed low half first."""
    return struct.unpack("<I", struct.pack("<2e", *pair))[0]


def _run_ptx(asm: str, inputs: dict[int, int]) -> dict[int, int]:
    """Run a decode kernel's inline PTX on the CPU (the interpreter runs none): the integer ops and
    fp32 FMAs it uses, on 32-bit words. inputs: operand number -> word; returns the words of the
    operands it writes."""
    regs: dict[str, int] = {}
    out: dict[int, int] = {}

    def val(op: str) -> int:
        if op.startswith("$"):      # an output operand reads back what was written to it
            k = int(op[1:])
            return out[k] if k in out else inputs[k]
        return regs[op] if op in regs else int(op, 0)

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dst, *args = [a.strip() for a in rest.split(",")]
        a = [val(x) for x in args]
        if op == "mov.b32":
            r = a[0]
        elif op == "xor.b32":
            r = a[0] ^ a[1]
        elif op == "and.b32":
            r = a[0] & a[1]
        elif op == "prmt.b32":      # bytes of {a[1], a[0]}, picked by the selector's nibbles (no sign mode)
            src = a[0] | a[1] << 32
            assert all(a[2] >> 4 * i & 8 == 0 for i in range(4)), line
            r = sum((src >> 8 * (a[2] >> 4 * i & 7) & 0xFF) << 8 * i for i in range(4))
        elif op == "lop3.b32":      # bit i: the table's bit at (a_i b_i c_i) read as a 3-bit number
            r = sum((a[3] >> ((a[0] >> i & 1) << 2 | (a[1] >> i & 1) << 1 | (a[2] >> i & 1)) & 1) << i
                    for i in range(32))
        elif op == "fma.rn.f32":    # (the product of two fp32 numbers is exact in a double)
            r = _word(_f32(a[0]) * _f32(a[1]) + _f32(a[2]))
        elif op in ("fma.rn.f16x2", "sub.f16x2"):     # each 16-bit half, rounded once to fp16
            h = [_halves(w) for w in a]
            r = _f16x2([x * y + z for x, y, z in zip(*h)] if op.startswith("fma") else [x - y for x, y in zip(*h)])
        else:
            raise AssertionError(f"no emulation for {op}")
        if dst.startswith("$"):
            out[int(dst[1:])] = r
        else:
            regs[dst] = r & 0xFFFFFFFF
    return out


@pytest.mark.parametrize("n", [1, 2, 4])
def test_i4_fma_ptx_sums_bytes_and_low_nibbles_exactly(n):
    """The int4 expand's PTX (_i4_fma: which the interpreter cannot run), executed by an emulator
    of its instructions: for n rows of 4 bytes it returns acc + sum v * u * 2^-141 and acc + sum
    v * (lo + 8) * 2^-141 (u: the byte with both nibbles biased by 8), the numbers that
    _i4_rows_sum turns into the even and odd columns; each operand in its place and read where it
    should be. Rounding only at fp32 FMAs: products of subnormals stay exact."""
    import random
    import re
    rng = random.Random(n)
    asm = tlora._i4_fma_asm(n)
    assert tlora._I4_FMA_C4.value.split(",") == ["=r"] * 8 + ["r"] * 28
    for _ in range(20):
        q = [[rng.randrange(256) for _ in range(4)] for _ in range(n)]          # row i, byte c
        v = [_f32_round(rng.uniform(-3, 3) * 2.0 ** 72) for _ in range(n)]     # the kernel's v * 2^72
        acc = [[_f32_round(rng.uniform(-1, 1) * 2.0 ** -60) for _ in range(4)] for _ in range(2)]
        ins = {8 + i: sum(b << 8 * c for c, b in enumerate(q[i])) for i in range(n)}
        ins.update({8 + n + 4 * i + c: _word(v[i]) for i in range(n) for c in range(4)})
        ins.update({8 + 5 * n + 4 * k + c: _word(acc[k][c]) for k in range(2) for c in range(4)})
        out = _run_ptx(asm, ins)
        assert sorted(out) == list(range(8))
        for c in range(4):
            u = [q[i][c] ^ 0x88 for i in range(n)]
            tu = [acc[0][c]] + [v[i] * u[i] * 2.0 ** -141 for i in range(n)]
            tl_ = [acc[1][c]] + [v[i] * (u[i] & 15) * 2.0 ** -141 for i in range(n)]
            # fp32 rounding of each FMA: a few ulps of the largest partial sum, never of the terms' scale
            assert abs(_f32(out[c]) - sum(tu)) <= 2.0 ** -22 * sum(map(abs, tu))
            assert abs(_f32(out[4 + c]) - sum(tl_)) <= 2.0 ** -22 * sum(map(abs, tl_))
        # from zero accumulators, _i4_rows_sum's recovery gives the sums over the signed nibbles
        out = _run_ptx(asm, {**ins, **{8 + 5 * n + k: 0 for k in range(8)}})
        vs = [x * 2.0 ** -72 for x in v]
        for c in range(4):
            su, sl = _f32(out[c]) * 2.0 ** 69, _f32(out[4 + c]) * 2.0 ** 69
            lo = [vs[i] * ((q[i][c] & 15) ^ 8) - 8 * vs[i] for i in range(n)]    # signed: nibble ^ 8 - 8
            hi = [vs[i] * ((q[i][c] >> 4) ^ 8) - 8 * vs[i] for i in range(n)]
            bound = 2.0 ** -20 * sum(abs(x) * 16 for x in vs)
            assert abs(sl - 8 * sum(vs) - sum(lo)) <= bound
            assert abs((su - sl) / 16 - 8 * sum(vs) - sum(hi)) <= bound
    reads = [int(k) for line in asm.splitlines() for k in re.findall(r"\$(\d+)", line.split(",", 1)[-1])]
    assert [reads.count(8 + i) for i in range(n)] == [1] * n                    # each row's bytes xor-ed once
    assert all(reads.count(k) == 2 for k in range(8 + n, 8 + 5 * n))            # each v: the byte's and the nibble's FMA
    assert all(reads.count(k) == 1 for k in range(8 + 5 * n, 16 + 5 * n))       # each acc once


def test_biased_fma_ptx_runs_the_bias_sum():
    """int8's BIAS PTX (_biased_fma) through the same emulator: acc + sum (2^15 + q + 128) v."""
    import random
    rng = random.Random(3)
    n = 4
    q = [[rng.randrange(-128, 128) for _ in range(4)] for _ in range(n)]
    v = [_f32_round(rng.uniform(-2, 2)) for _ in range(n)]
    acc = [_f32_round(rng.uniform(-1, 1)) for _ in range(4)]
    ins = {4 + i: sum((b & 0xFF) << 8 * c for c, b in enumerate(q[i])) for i in range(n)}
    ins.update({4 + n + 4 * i + c: _word(v[i]) for i in range(n) for c in range(4)})
    ins.update({4 + 5 * n + c: _word(acc[c]) for c in range(4)})
    out = _run_ptx(tlora._biased_fma_asm(n), ins)
    for c in range(4):
        terms = [acc[c]] + [(32896 + q[i][c]) * v[i] for i in range(n)]
        assert abs(_f32(out[c]) - sum(terms)) <= 2.0 ** -22 * sum(map(abs, terms))


def test_fp16_dequantizing_ptx_gives_the_exact_weights():
    """The PTX the interpreter cannot run, through the emulator: _i8_to_f16_ptx gives each int8
    weight as fp16 exactly; _i8_fma_f16 adds (q / 128) * x; _i4_fma_f16 adds (low nibble / 8) * xe
    to the even accumulators and (high nibble / 8) * xo to the odd ones. Operands in the packed
    order Triton gives them (pack 4: 4 bytes in one word, fp16 pairs low half first)."""
    import random
    rng = random.Random(11)
    signed = lambda n: n - 16 if n >= 8 else n      # noqa: E731
    for _ in range(50):
        q = [rng.randrange(-128, 128) for _ in range(4)]
        qw = sum((b & 0xFF) << 8 * c for c, b in enumerate(q))
        out = _run_ptx(tlora._I8_TO_F16_ASM.value, {2: qw})
        assert _halves(out[0]) + _halves(out[1]) == [float(x) for x in q]

        x = [round(rng.uniform(-4, 4), 2) for _ in range(4)]
        acc = [round(rng.uniform(-2, 2), 2) for _ in range(4)]
        xs, accs = [_halves(_f16x2(x[i:i + 2])) for i in (0, 2)], [_halves(_f16x2(acc[i:i + 2])) for i in (0, 2)]
        out = _run_ptx(tlora._I8_FMA_F16_ASM.value, {2: qw, 3: _f16x2(xs[0]), 4: _f16x2(xs[1]),
                                                       5: _f16x2(accs[0]), 6: _f16x2(accs[1])})
        got, xf, af = _halves(out[0]) + _halves(out[1]), xs[0] + xs[1], accs[0] + accs[1]
        assert got == [_halves(_f16x2([af[i] + q[i] / 128 * xf[i], 0]))[0] for i in range(4)]

        b = [rng.randrange(256) for _ in range(4)]
        xe, xo = [[round(rng.uniform(-4, 4), 2) for _ in range(4)] for _ in range(2)]
        ae, ao = [[round(rng.uniform(-2, 2), 2) for _ in range(4)] for _ in range(2)]
        f16 = lambda v: _halves(_f16x2(v[:2])) + _halves(_f16x2(v[2:]))      # noqa: E731
        xe, xo, ae, ao = f16(xe), f16(xo), f16(ae), f16(ao)
        ins = {4: sum(v << 8 * c for c, v in enumerate(b))}
        for k, v in enumerate((xe, xo, ae, ao)):
            ins[5 + 2 * k], ins[6 + 2 * k] = _f16x2(v[:2]), _f16x2(v[2:])
        out = _run_ptx(tlora._I4_FMA_F16_ASM.value, ins)
        even, odd = _halves(out[0]) + _halves(out[1]), _halves(out[2]) + _halves(out[3])
        assert even == [_halves(_f16x2([ae[i] + signed(b[i] & 15) / 8 * xe[i], 0]))[0] for i in range(4)]
        assert odd == [_halves(_f16x2([ao[i] + signed(b[i] >> 4) / 8 * xo[i], 0]))[0] for i in range(4)]


def test_ptx_dequantization_levels_fall_back_where_they_cannot_run():
    """PTX_DQ's levels: none in the interpreter or for fp16 rows, fp16x2 products only where the
    caller allows them (fp16 activations, few enough K steps), level 1 otherwise."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    dq = tlora._ptx_dq
    assert dq({"PTX_DQ": 2}, True, cuda, True) == 2
    assert dq({"PTX_DQ": 2}, True, cuda, False) == 1
    assert dq({"PTX_DQ": 1}, True, cuda, True) == 1
    assert dq({"PTX_DQ": 2}, True, cpu, True) == 0 and dq({"PTX_DQ": 2}, False, cuda, True) == 0
    assert dq({}, True, cuda, True) == 0


def _decode_variant(monkeypatch, variant: dict) -> None:
    """The variant over every decode family's defaults; the int8 expand by row chunks (ROWS, the
    default from 64 tokens) only where the variant asks, so the others test the column tiles."""
    for family in ("shrink_decode", "expand_decode", "shrink_decode_int8", "expand_decode_int8", "shrink_decode_int4"):
        monkeypatch.setitem(tlora.TUNE, family, {**tlora.TUNE[family], "ROWS": False, **variant})


@DECODE_VARIANTS
@ADAPTER_DTYPES
def test_decode_variants_match_the_reference(variant, adapter_dtype, monkeypatch):
    """The decode schedule's TUNE variants give the reference's result, with base tokens, mixed
    ranks and a rank-0 module in the batch."""
    _decode_variant(monkeypatch, variant)
    _check_decode_mix(91, adapter_dtype)


def _spy_launches(monkeypatch, name: str) -> list:
    """The grids kernel ``name`` of triton_lora launches with, from here on."""
    launches = []
    kernel = getattr(tlora, name)
    monkeypatch.setattr(tlora, name, type("Spy", (), {
        "__getitem__": lambda self, grid: launches.append(grid) or kernel[grid]})())
    return launches


@pytest.mark.parametrize("tiles", [dict(BLOCK_R=4, BLOCK_N=16, SPLIT=2, PIPE=1, G4=True), dict(BLOCK_R=8, BLOCK_N=32, PDL=False),
                                   dict(BLOCK_R=16, BLOCK_N=64, SPLIT=3, PIPE=2, G4=True)],
                         ids=["r4-split2-g4", "r8", "r16-split3-g4"])
@pytest.mark.parametrize("adapter_dtype", [torch.int8, INT4], ids=["rows-int8", "rows-int4"])
def test_rows_expand_tiles_match_the_reference(tiles, adapter_dtype, monkeypatch):
    """The int8 expand by row chunks (ROWS) at several tiles: chunks of all or part of BLOCK_R rows,
    tokens of one chunk (stored) and of several (atomics), several column steps and column splits,
    one module and q/k/v in one launch, rows in one tile or four (G4; 4-row chunks' 2-row halves
    fall back to one); each against the reference, and the row-chunk kernel ran."""
    for family in ("expand_decode_rows", "expand_decode_rows_int4"):
        monkeypatch.setitem(tlora.TUNE, family, {**tlora.TUNE[family], **tiles})
    for family in ("expand_decode", "expand_decode_int8"):
        monkeypatch.setitem(tlora.TUNE, family, {**tlora.TUNE[family], "ROWS": True})
    launches = _spy_launches(monkeypatch, "_expand_rows_kernel")
    _check_decode_mix(95, adapter_dtype)
    pick = [(i * 5) % 4 - 1 for i in range(21)]
    allm = tuple(TARGET_MODULES)
    _check_lora_fused(TINY, torch.float16, [1] * len(pick), pick, [8, 16, 24], [allm, ("q_proj", "v_proj"), allm],
                      [("q_proj", "k_proj", "v_proj")], 1, 2e-3, torch.Generator().manual_seed(96),
                      adapter_dtype=adapter_dtype)
    assert launches and all(g[1] == tiles.get("SPLIT", 1) for g in launches)


def _check_fused_decode(cfg, dtype, pick, ranks, mods, layer, tol, gen, block_tokens, adapter_dtype):
    """lora_apply (one module, o, and q/k/v) against the reference's shrink then expand on fp32 x
    (so v unrounded, as the fused kernel keeps it): into column slices of a wider y whose
    neighbours stay untouched, and the delta alone into zeros; base tokens get exactly nothing."""
    pool, table, batch = _lora_setup(cfg, dtype, [1] * len(pick), pick, ranks, mods, gen, block_tokens, False,
                                     adapter_dtype)
    F, R, S = table.flat, table.rows, table.row_scale
    T = len(pick)
    for group in (("o_proj",), ("q_proj", "k_proj", "v_proj")):
        i0 = TARGET_MODULES.index(group[0])
        meta = table.meta[:, layer, i0] if len(group) == 1 else table.meta[:, layer, i0:i0 + len(group)]
        widths = tuple(cfg.module_dims(m)[1] for m in group)
        w = widths if len(group) > 1 else None
        W = sum(widths)
        x = torch.randn(T, cfg.module_dims(group[0])[0], generator=gen).to(DEV, dtype)
        want = torch.zeros(T, W, dtype=torch.float32, device=DEV)
        ref.lora_apply(want, x.float(), F, R, meta, table.scaling, batch, w, S)
        assert want.abs().sum() > 0
        big = torch.randn(T, W + 16, generator=gen).to(DEV, dtype)
        base = big.clone()
        tlora.lora_apply(big[:, 8:8 + W], x, F, R, meta, table.scaling, batch, w, S)
        assert torch.equal(big[:, :8], base[:, :8]) and torch.equal(big[:, 8 + W:], base[:, 8 + W:])
        assert rel_err(big[:, 8:8 + W].float(), base[:, 8:8 + W].float() + want) < tol, group
        delta = torch.zeros(T, W, dtype=dtype, device=DEV)
        tlora.lora_apply(delta, x, F, R, meta, table.scaling, batch, w, S)
        assert rel_err(delta.float(), want) < tol, (group, rel_err(delta.float(), want))
        base_rows = torch.tensor([p < 0 for p in pick], device=DEV)
        assert torch.equal(delta[base_rows], torch.zeros_like(delta[base_rows]))


FUSED_TILES = pytest.mark.parametrize(
    "tiles", [dict(BLOCK_R=8, BLOCK_K=32, BLOCK_N=32, PIPE=2, PIPE_E=2, G4=True, MULTI=dict(BLOCK_K=16)),
              dict(BLOCK_R=4, BLOCK_K=64, BLOCK_N=16, PIPE=1, PIPE_E=1, G4=True, PDL=False, MULTI={}),
              dict(BLOCK_R=16, BLOCK_K=16, BLOCK_N=64, PIPE=3, PIPE_E=2, G4=False, MULTI=dict(BLOCK_R=8, PIPE_E=1)),
              dict(BLOCK_R=8, BLOCK_K=32, BLOCK_N=32, PIPE=2, PIPE_E=2, G8=True, PREFETCH=3,
                   MULTI=dict(BLOCK_N=16, BLOCK_R=4)),
              dict(BLOCK_R=8, BLOCK_K=32, BLOCK_N=32, PIPE=2, PIPE_E=2, G4=True, SUB=2,
                   MULTI=dict(BLOCK_K=64, SUB=4, BLOCK_R=16))],
    ids=["r8-g4-multi-k16", "r4-g4", "r16-multi-r8", "r8-g8-multi-r4", "r8-sub2-multi-sub4"])


@FUSED_TILES
@pytest.mark.parametrize("adapter_dtype", [torch.int8, INT4], ids=["rows-int8", "rows-int4"])
def test_fused_decode_lora_matches_the_reference(tiles, adapter_dtype, monkeypatch):
    """lora_apply's one launch (shrink and expand by rank-row chunks, FUSED) against the reference's
    shrink then expand in fp32: one module and q/k/v (GQA widths, on MULTI's tiles) into column slices whose
    neighbours stay untouched, base tokens, a rank-0 module, ranks that fill a chunk, span several
    (atomics) or end inside one (12), several d_in and column steps; and the fused kernel ran."""
    for family in ("fused_decode_int8", "fused_decode_int4"):
        monkeypatch.setitem(tlora.TUNE, family, {**tlora.TUNE[family], "FUSED": True, "MIN_T": 1, **tiles})
    launches = _spy_launches(monkeypatch, "_fused_decode_kernel")
    qkv = ("q_proj", "k_proj", "v_proj")
    mods = [qkv + ("o_proj",), ("q_proj", "v_proj", "o_proj"), qkv, qkv + ("o_proj",)]
    _check_fused_decode(TINY, torch.float16, [(i * 7) % 5 - 1 for i in range(13)], [8, 16, 32, 12], mods, 1, 2e-3,
                        torch.Generator().manual_seed(97), 4, adapter_dtype)
    assert len(launches) == 4


def test_fused_decode_lora_takes_the_split_kernels_where_it_does_not_apply(monkeypatch):
    """lora_apply runs shrink then expand for rows in the model's dtype, below MIN_T tokens, for
    prefill segments and with FUSED off: the fused kernel never launches, and the result is the
    reference's."""
    launches = _spy_launches(monkeypatch, "_fused_decode_kernel")
    gen = torch.Generator().manual_seed(98)
    for adapter_dtype, lens, fused in ((None, [1] * 5, {}), (INT4, [1] * 5, {"MIN_T": 6}), (INT4, [3, 2], {}),
                                       (torch.int8, [1] * 5, {"FUSED": False, "MIN_T": 1})):
        for family in ("fused_decode_int8", "fused_decode_int4"):
            monkeypatch.setitem(tlora.TUNE, family, {**tlora.TUNE[family], **fused})
        pool, table, batch = _lora_setup(TINY, torch.float16, lens, [0, 1, 0, 1, 0][:len(lens)], [8, 16],
                                         [TARGET_MODULES] * 2, gen, 4, False, adapter_dtype)
        meta = table.meta[:, 0, TARGET_MODULES.index("o_proj")]
        x = torch.randn(sum(lens), TINY.hidden_size, generator=gen).to(DEV, torch.float16)
        y = torch.randn(sum(lens), TINY.hidden_size, generator=gen).to(DEV, torch.float16)
        want = y.clone()
        tlora.lora_apply(y, x, table.flat, table.rows, meta, table.scaling, batch, row_scale=table.row_scale)
        ref.lora_apply(want, x, table.flat, table.rows, meta, table.scaling, batch, row_scale=table.row_scale)
        assert rel_err(y, want) < 2e-3
    assert not launches


@ADAPTER_DTYPES
def test_compact_shrink_plan_serves_every_layer(adapter_dtype, monkeypatch):
    """The compact shrink grid builds its plan once per batch from the ranks over all layers and
    reuses it at every layer: adapters that target a module in some layers only (PEFT's
    layers_to_transform) get their rows where they have them and zeros where not."""
    for family in ("shrink_decode", "shrink_decode_int8", "shrink_decode_int4"):
        monkeypatch.setitem(tlora.TUNE, family, {**tlora.TUNE[family], "COMPACT": True})
    gen = torch.Generator().manual_seed(93)
    qkv = ("q_proj", "k_proj", "v_proj")
    weights = [random_adapter(TINY, "all", 16, qkv, gen=gen), random_adapter(TINY, "late", 24, ("q_proj", "v_proj"), [1], gen),
               random_adapter(TINY, "early", 8, qkv, [0], gen)]
    probe = UnifiedPool(TINY, 1, 4, torch.float16, "cpu", adapter_dtype)
    staged = [stage_adapter(w, probe) for w in weights]
    pool = UnifiedPool(TINY, sum(s.num_pages for s in staged) + 2, 4, torch.float16, DEV, adapter_dtype)
    table = AdapterTable(pool, 4)
    slots = [table.insert(s).slot for s in staged]
    pick = [slots[i % 3] if i % 5 else -1 for i in range(11)]
    batch = LoraBatch.build([1] * len(pick), pick, 24, DEV)
    x = torch.randn(len(pick), TINY.hidden_size, generator=gen).to(DEV, torch.float16)
    for layer in (0, 1, 0):          # the plan comes from the first call, whatever its layer
        meta = table.meta[:, layer, 0:3]
        v = tlora.lora_shrink(x, table.flat, table.rows, meta, batch, table.row_scale)
        want = ref.lora_shrink(x, table.flat, table.rows, meta, batch, table.row_scale)
        assert torch.equal(v[want == 0], want[want == 0]) and rel_err(v, want) < 2e-3, (layer, rel_err(v, want))
        assert (want[:, :, :8] != 0).any()
    assert len(batch.plans) == 1     # one plan for all layers


def _down_proj_delta(adapter_dtype):
    """(the reference's down_proj LoRA delta over a mixed fp32 batch, the pool, the table), with the
    same adapters and inputs whatever format the pool stores rows in."""
    g = torch.Generator().manual_seed(5)
    pool, table, batch = _lora_setup(TINY, torch.float32, [3, 1, 4, 1], [0, -1, 1, 0], [8, 16],
                                     [("q_proj", "down_proj")] * 2, g, 4, False, adapter_dtype)
    meta = table.meta[:, 0, TARGET_MODULES.index("down_proj")]
    x = torch.randn(9, TINY.intermediate_size, generator=g).to(DEV)
    y = torch.zeros(9, TINY.hidden_size, device=DEV)
    ref.lora_apply(y, x, table.flat, table.rows, meta, table.scaling, batch, row_scale=table.row_scale)
    return y, pool, table


def test_int8_rows_stay_within_their_quantization_error():
    """int8 rows (opt-in): each element within half a step of the weight it stores, a zero row
    stays zero, and a LoRA delta over a mixed batch is within 1% of the unquantized adapter's.
    The kernels match the int8 reference (the tests above); this bounds the reference itself."""
    from server.pool import quantize_rows
    gen = torch.Generator().manual_seed(77)
    m = torch.randn(6, 40, generator=gen) * torch.logspace(-4, 1, 6)[:, None]
    m[2] = 0
    q, scale = quantize_rows(m)
    assert q.dtype == torch.int8 and scale[2] == 0 and not q[2].any()
    assert ((q.float() * scale[:, None] - m).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all()
    assert (q.abs().amax(dim=1)[scale > 0] == 127).all()

    deltas = {}
    for adapter_dtype in (None, torch.int8):
        deltas[adapter_dtype], pool, table = _down_proj_delta(adapter_dtype)
        assert table.flat.dtype == (adapter_dtype or torch.float32)
        assert (table.row_scale is not None) == (adapter_dtype is not None)
    err = rel_err(deltas[torch.int8], deltas[None])
    assert 0 < err < 1e-2, err


def test_int4_rows_stay_within_their_quantization_error():
    """int4 rows (opt-in): two weights a byte, low nibble first, round-trip exactly (odd widths
    too); each row's scale is the clip of least squared error, so no row is worse than rounding at
    its max |w| would be, every element not clipped is within half a step, and a zero row stays
    zero; a LoRA delta over a mixed batch is within 25% of the unquantized adapter's and further
    from it than int8 rows' (4 bits, not 8, really are what the pool holds)."""
    from server.pool import pack_int4, quantize_rows_int4, unpack_int4
    gen = torch.Generator().manual_seed(78)
    for width in (7, 40):
        q = torch.randint(-8, 8, (5, width), generator=gen, dtype=torch.int8)
        b = pack_int4(q)
        assert b.dtype == torch.uint8 and b.shape == (5, (width + 1) // 2)
        assert torch.equal(unpack_int4(b, width), q)
        assert torch.equal(b[:, 0] & 0xF, (q[:, 0] & 0xF).view(torch.uint8))      # column 0: the low nibble
    m = torch.randn(6, 4096, generator=gen) * torch.logspace(-4, 1, 6)[:, None]
    m[2] = 0
    b, scale = quantize_rows_int4(m)
    q = unpack_int4(b, m.shape[1]).float()
    assert scale[2] == 0 and not q[2].any()
    err = (q * scale[:, None] - m).square().sum(dim=1)
    amax = m.abs().amax(dim=1)
    no_clip = (torch.round(m / (amax / 7).clamp_min(1e-30)[:, None]).clamp(-8, 7) * (amax / 7)[:, None] - m).square().sum(dim=1)
    assert (err <= no_clip * (1 + 1e-6)).all()
    assert (scale[scale > 0] < amax[scale > 0] / 7).all()     # Gaussian rows of 4096: a clip beats none
    inside = m.abs() <= 7 * scale[:, None]
    assert ((q * scale[:, None] - m).abs()[inside] <= (scale[:, None] / 2 * (1 + 1e-5)).expand_as(m)[inside]).all()
    rms = (err / m.shape[1]).sqrt() / m.std(dim=1)
    assert (rms[scale > 0] < 0.13).all(), rms

    deltas = {}
    for adapter_dtype in (None, torch.int8, INT4):
        deltas[adapter_dtype], pool, table = _down_proj_delta(adapter_dtype)
    assert table.flat.dtype == torch.uint8 and pool.adapter_format == "int4"
    err4, err8 = rel_err(deltas[INT4], deltas[None]), rel_err(deltas[torch.int8], deltas[None])
    assert 4 * err8 < err4 < 0.25, (err4, err8)


def _staged_rows_match(w, adapter_dtype, quantize):
    """stage_adapter(w) into a pool of adapter_dtype: every row holds quantize() of its own matrix
    (bytes and scale), however stage_adapter batched the matrices. Returns the staged adapter and
    the rows checked."""
    st = stage_adapter(w, UnifiedPool(TINY, 1, 4, torch.float32, "cpu", adapter_dtype))
    flat = st.images.view(-1)
    seen = 0
    for (layer, module), (a, b) in w.matrices():
        a_start, b_start, ra, rb = st.meta[layer, TARGET_MODULES.index(module)].tolist()
        for start, m in ((a_start, a), (b_start, b.t())):
            q, scale = quantize(m)
            for j in range(m.shape[0]):
                off = int(st.rel_offsets[start + j])
                assert torch.equal(flat[off:off + q.shape[1]], q[j]), (layer, module, j)
            assert torch.equal(st.row_scale[start:start + m.shape[0]], scale)
            seen += m.shape[0]
    return st, seen


@pytest.mark.parametrize("rank", [1, 8, 40])
def test_staged_int4_rows_take_half_the_bytes(rank):
    """int4 staging: every row holds pack_int4 of its own matrix's quantized values, in half the
    bytes of an int8 row, with the same scales as quantizing each matrix alone."""
    from server.pool import quantize_rows_int4
    mods = ("q_proj", "k_proj", "gate_proj", "down_proj")
    w = random_adapter(TINY, "a", rank, mods, gen=torch.Generator().manual_seed(rank))
    st, _ = _staged_rows_match(w, INT4, quantize_rows_int4)
    st8 = stage_adapter(w, UnifiedPool(TINY, 1, 4, torch.float32, "cpu", torch.int8))
    assert st.images.dtype == torch.uint8 and st.num_pages <= st8.num_pages
    if rank == 40:      # (small ranks fit one page either way)
        assert st.images.nbytes < 0.6 * st8.images.nbytes


@pytest.mark.parametrize("rank", [1, 8, 40])
def test_staged_int8_rows_are_each_matrix_quantized_alone(rank):
    """stage_adapter quantizes runs of same-width matrices together (one call per ~64 rows):
    every row's int8 values and scale must equal quantizing its own matrix alone, across
    widths that change between modules (attention, then MLP rows of another width)."""
    from server.pool import quantize_rows
    mods = ("q_proj", "k_proj", "gate_proj", "down_proj")
    w = random_adapter(TINY, "a", rank, mods, gen=torch.Generator().manual_seed(rank))
    st, seen = _staged_rows_match(w, torch.int8, quantize_rows)
    assert seen == st.rel_offsets.numel() == st.row_scale.numel()


# -------------------------------------------------------------------------------------------------
# attention
# -------------------------------------------------------------------------------------------------
def _check_attn(cfg, dtype, q_lens, ctx_lens, layer, tol, gen, block_tokens=4, extra=0, max_context=None):
    pool = UnifiedPool(cfg, 2 + sum(-(-n // block_tokens) for n in ctx_lens) * 2 * cfg.num_layers + extra,
                       block_tokens, dtype, DEV)
    pool.data.copy_(torch.randn(pool.data.shape, generator=gen))   # cached prefixes: random K/V
    batch = build_attn(pool, q_lens, ctx_lens, DEV, gen)
    if max_context is not None:       # as a CUDA graph captures it: the longest context it allows
        batch.max_context = max_context
    kv = pool.kv_view()
    T = sum(q_lens)
    Hq, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    # new tokens' K/V, from a strided qkv-like buffer
    qkv = torch.randn(T, Hq + 2 * Hkv, D, generator=gen).to(DEV, dtype)
    q, k, v = qkv[:, :Hq], qkv[:, Hq:Hq + Hkv], qkv[:, Hq + Hkv:]
    kv_ref = kv.clone()
    tatt.write_kv(k, v, kv, layer, batch)
    ref.write_kv(k, v, kv_ref, layer, batch)
    assert torch.equal(kv, kv_ref)
    scale = D ** -0.5
    poison(q.numel(), dtype)
    out = tatt.paged_attention(q, kv, layer, batch, scale)
    want = ref.paged_attention(q, kv, layer, batch, scale)
    assert out.shape == want.shape and out.dtype == want.dtype
    e = rel_err(out, want)
    assert e < tol, e
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_decode(dtype):
    gen = torch.Generator().manual_seed(11)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    _check_attn(TINY, dtype, [1, 1, 1], [1, 13, 37], 1, tol, gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_prefill_cached_prefix(dtype):
    gen = torch.Generator().manual_seed(12)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    # fresh prefill, prefill over a cached prefix, a decode token in the same batch
    _check_attn(TINY, dtype, [21, 7, 1], [21, 30, 9], 0, tol, gen)


def test_attention_mha_odd_block():
    gen = torch.Generator().manual_seed(13)
    cfg = ModelConfig(hidden_size=48, intermediate_size=64, num_layers=1, num_heads=3, num_kv_heads=3,
                      head_dim=16, vocab_size=64)
    _check_attn(cfg, torch.float32, [1, 1], [5, 11], 0, 1e-5, gen, block_tokens=3)
    _check_attn(cfg, torch.float32, [6, 2], [6, 11], 0, 1e-5, gen, block_tokens=3)


def test_attention_decode_split():
    """Long context with few sequences: the decode path splits the context and merges."""
    gen = torch.Generator().manual_seed(14)
    cfg = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                      head_dim=16, vocab_size=64)
    _check_attn(cfg, torch.float32, [1], [150], 0, 1e-5, gen, block_tokens=8)


@pytest.mark.parametrize("ctx_lens", [[150], [150, 5, 40], [3]])
def test_attention_decode_split_sized_by_each_context(ctx_lens):
    """A graph fixes the split count for its largest context (4096 here); each sequence then splits
    its own context evenly, and splits past a short one hold nothing, which the merge must ignore."""
    gen = torch.Generator().manual_seed(15)
    cfg = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                      head_dim=16, vocab_size=64)
    _check_attn(cfg, torch.float32, [1] * len(ctx_lens), ctx_lens, 0, 1e-5, gen, block_tokens=8, max_context=4096)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_and_rope(dtype):
    gen = torch.Generator().manual_seed(15)
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    for H in (64, 40):
        x = torch.randn(7, H, generator=gen).to(DEV, dtype)
        w = (1 + 0.1 * torch.randn(H, generator=gen)).to(DEV, dtype)
        poison(7 * H, dtype)
        out = tnr.rms_norm(x, w, 1e-6)
        want = ref.rms_norm(x, w, 1e-6)
        assert out.shape == want.shape and out.dtype == want.dtype
        assert rel_err(out, want) < tol
        out = tnr.rms_norm(x.view(7, 1, H), w.float(), 1e-5)   # fp32 weight: fp32 output
        assert out.dtype == torch.float32 and rel_err(out, ref.rms_norm(x.view(7, 1, H), w.float(), 1e-5)) < tol
    qkv = torch.randn(5, 7, 16, generator=gen).to(DEV, dtype)
    q = qkv[:, :3]                                   # a strided view, as the model slices qkv
    ang = torch.randn(5, 8, generator=gen).to(DEV)
    cos, sin = ang.cos(), ang.sin()
    poison(q.numel(), dtype)
    out = tnr.apply_rope(q, cos, sin)
    assert rel_err(out, ref.apply_rope(q, cos, sin)) < tol


def _check_rope_write_kv(cfg, dtype, q_lens, ctx_lens, layer, gen, block_tokens=4):
    pool = UnifiedPool(cfg, 2 + sum(-(-n // block_tokens) for n in ctx_lens) * 2 * cfg.num_layers,
                       block_tokens, dtype, DEV)
    pool.data.copy_(torch.randn(pool.data.shape, generator=gen))
    batch = build_attn(pool, q_lens, ctx_lens, DEV, gen)
    T, Hq, Hkv, D = sum(q_lens), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, generator=gen).to(DEV, dtype)
    pos = torch.tensor([p for m, n in zip(q_lens, ctx_lens) for p in range(n - m, n)], device=DEV)
    ang = pos.float()[:, None] * torch.rand(D // 2, generator=gen).to(DEV)
    kv = pool.kv_view()
    kv_ref = kv.clone()
    poison(T * Hq * D, dtype)
    q = tatt.rope_write_kv(qkv, ang.cos(), ang.sin(), kv, layer, batch, Hq, Hkv)
    q_ref = ref.rope_write_kv(qkv, ang.cos(), ang.sin(), kv_ref, layer, batch, Hq, Hkv)
    assert q.shape == (T, Hq, D) and q.dtype == dtype
    # the same fp32 rotation rounded once: equal up to one rounding of the last bit
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert rel_err(q, q_ref) < tol
    assert rel_err(kv, kv_ref) < tol
    untouched = torch.ones(kv.shape[0], dtype=torch.bool, device=DEV)
    untouched[batch.token_pages[:, 2 * layer:2 * layer + 2].long().flatten()] = False
    assert untouched.any() and torch.equal(kv[untouched], kv_ref[untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_write_kv(dtype):
    """RoPE on q and k of the fused qkv row, k and v into their KV pages, in one kernel: the rotated
    q and every KV page (written and untouched) match the reference's rope then write_kv."""
    gen = torch.Generator().manual_seed(17)
    _check_rope_write_kv(TINY, dtype, [1, 1, 1], [1, 13, 37], 1, gen)          # decode, GQA (4 q, 2 kv heads)
    _check_rope_write_kv(TINY, dtype, [21, 7, 1], [21, 30, 9], 0, gen)         # prefill and decode
    mha = ModelConfig(hidden_size=48, intermediate_size=64, num_layers=1, num_heads=3, num_kv_heads=3,
                      head_dim=16, vocab_size=64)
    _check_rope_write_kv(mha, dtype, [2, 1], [5, 11], 0, gen, block_tokens=3)   # 9 heads: not a power of two


def _check_add_norm_silu(T, H, I, dtype, tol, gen):
    x = torch.randn(T, H, generator=gen).to(DEV, dtype)
    d = torch.randn(T, H + 8, generator=gen).to(DEV, dtype)[:, 4:4 + H]     # a strided view
    w = (1 + 0.1 * torch.randn(H, generator=gen)).to(DEV, dtype)
    x_ref = x.clone()
    poison(T * H, dtype)
    h = tnr.add_rms_norm(x, d, w, 1e-5)
    h_ref = ref.add_rms_norm(x_ref, d, w, 1e-5)
    assert torch.equal(x, x_ref), "the residual stream must be x + d rounded as torch rounds it"
    assert h.dtype == h_ref.dtype and rel_err(h, h_ref) < tol
    gu = torch.randn(T, 2 * I, generator=gen).to(DEV, dtype) * 3
    poison(T * I, dtype)
    a = tnr.silu_mul(gu)
    a_ref = ref.silu_mul(gu)
    assert a.shape == (T, I) and torch.isfinite(a).all() and rel_err(a, a_ref) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_rms_norm_and_silu_mul(dtype):
    gen = torch.Generator().manual_seed(16)
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    _check_add_norm_silu(7, 64, 96, dtype, tol, gen)
    _check_add_norm_silu(3, 40, 72, dtype, tol, gen)      # widths that are not powers of two


def test_ops_table():
    from kernels import triton_ops
    assert set(triton_ops.OPS) == {"lora_shrink", "lora_expand", "lora_apply", "write_kv", "paged_attention", "rms_norm",
                                   "add_rms_norm", "silu_mul", "apply_rope", "linear", "silu_mul_linear",
                                   "rope_write_kv"}


# -------------------------------------------------------------------------------------------------
# GEMV (the base model's projections at a few tokens)
# -------------------------------------------------------------------------------------------------
def _check_gemv(M, N, K, dtype, tol, gen, bias=False, **tune):
    x = torch.randn(M, K, generator=gen).to(DEV, dtype)
    w = (torch.randn(N, K, generator=gen) * 0.05).to(DEV, dtype)
    b = torch.randn(N, generator=gen).to(DEV, dtype) if bias else None
    poison(M * N, dtype)
    y = tgemv.gemv(x, w, b, **tune)
    want = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    assert y.shape == (M, N) and y.dtype == dtype
    e = rel_err(y, want)
    assert e < tol, (M, N, K, e)


@pytest.mark.parametrize("M", [1, 3, 16])
def test_gemv(M):
    """One token (multiply-reduce) and several (tensor-core dot), rows and K not multiples of the
    tiles, with and without a bias."""
    gen = torch.Generator().manual_seed(30)
    _check_gemv(M, 40, 96, torch.float32, 1e-5, gen, BLOCK_N=16, BLOCK_K=32)
    _check_gemv(M, 33, 200, torch.float32, 1e-5, gen, bias=True, BLOCK_N=16, BLOCK_K=64)
    _check_gemv(M, 64, 128, torch.float16, 2e-3, gen, BLOCK_N=32, BLOCK_K=64)


def _check_gated_gemv(M, N, K, dtype, tol, gen, **tune):
    gu = (torch.randn(M, 2 * K, generator=gen) * 3).to(DEV, dtype)
    w = (torch.randn(N, K, generator=gen) * 0.05).to(DEV, dtype)
    poison(M * N, dtype)
    y = tgemv.gemv(gu, w, gated=True, **tune)
    want = ref.silu_mul_linear(gu.double(), w.double())
    assert y.shape == (M, N) and y.dtype == dtype
    e = rel_err(y, want)
    assert e < tol, (M, N, K, e)


@pytest.mark.parametrize("M", [1, 3])
def test_gemv_gated(M):
    """SwiGLU's down projection with the activation computed inside the GEMV: silu(gate) * up of a
    [gate | up] input, K not a multiple of the tile."""
    gen = torch.Generator().manual_seed(32)
    _check_gated_gemv(M, 40, 96, torch.float32, 1e-5, gen, BLOCK_N=16, BLOCK_K=32)
    _check_gated_gemv(M, 33, 200, torch.float32, 1e-5, gen, BLOCK_N=16, BLOCK_K=64)
    _check_gated_gemv(M, 64, 128, torch.float16, 2e-3, gen, BLOCK_N=32, BLOCK_K=64)


def test_linear_takes_the_gemv_only_inside_a_graph_capture():
    """Eager calls stay on cuBLAS (Triton's launcher costs host time there); with no capture the
    op is F.linear itself, bit for bit."""
    gen = torch.Generator().manual_seed(31)
    x, w = torch.randn(1, 64, generator=gen).to(DEV), torch.randn(48, 64, generator=gen).to(DEV)   # the GEMV's shape
    assert torch.equal(tgemv.linear(x, w), torch.nn.functional.linear(x, w))


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 2, 8, 16])
def test_gpu_gemv_llama7b(dtype, M):
    gen = torch.Generator().manual_seed(32)
    tol = 2e-3 if dtype == torch.float16 else 1e-2
    for N, K in ((3 * 4096, 4096), (4096, 4096), (2 * 11008, 4096), (4096, 11008), (32000, 4096)):
        _check_gemv(M, N, K, dtype, tol, gen)
    _check_gemv(M, 1536, 4096, dtype, tol, gen, bias=True)     # a biased qkv (Qwen-style)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 2, 16])
def test_gpu_gemv_gated_llama7b(dtype, M):
    gen = torch.Generator().manual_seed(34)
    _check_gated_gemv(M, 4096, 11008, dtype, 2e-3 if dtype == torch.float16 else 1e-2, gen)
    _check_gated_gemv(M, 4096, 14336, dtype, 2e-3 if dtype == torch.float16 else 1e-2, gen)    # Llama-3-8B


@gpu
@needs_cuda
def test_gpu_silu_mul_linear_inside_a_graph():
    """The decode graph's down projection (activation fused into the GEMV) against the eager
    activation kernel plus cuBLAS."""
    gen = torch.Generator().manual_seed(35)
    gu = (torch.randn(1, 2 * 11008, generator=gen) * 3).to(DEV, torch.float16)
    w = (torch.randn(4096, 11008, generator=gen) * 0.02).to(DEV, torch.float16)
    eager = tgemv.silu_mul_linear(gu, w)
    assert torch.equal(eager, torch.nn.functional.linear(tnr.silu_mul(gu), w))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        tgemv.gemv(gu, w, gated=True)          # compile outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = tgemv.silu_mul_linear(gu, w)
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(out, eager) < 2e-3


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_rope_write_kv_llama7b(dtype):
    gen = torch.Generator().manual_seed(36)
    for cfg in (LLAMA7B, GQA):
        _check_rope_write_kv(cfg, dtype, [1] * 64, [int(n) for n in torch.randint(1, 600, (64,), generator=gen)],
                             0, gen, block_tokens=16)
        _check_rope_write_kv(cfg, dtype, [300, 1, 1], [300, 700, 33], 0, gen, block_tokens=16)


@gpu
@needs_cuda
def test_gpu_linear_inside_a_graph_matches_cublas():
    """The decode graph's projections (the GEMV) against the same projection eagerly (cuBLAS)."""
    gen = torch.Generator().manual_seed(33)
    x = torch.randn(1, 4096, generator=gen).to(DEV, torch.float16)      # one token: the GEMV's case
    w = (torch.randn(11008, 4096, generator=gen) * 0.02).to(DEV, torch.float16)
    eager = tgemv.linear(x, w)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        tgemv.linear(x, w)          # compile outside the capture
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        out = tgemv.linear(x, w)
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(out, eager) < 2e-3


# -------------------------------------------------------------------------------------------------
# GPU: Llama-7B shapes, fp16 and bf16
# -------------------------------------------------------------------------------------------------
LLAMA7B = ModelConfig(hidden_size=4096, intermediate_size=11008, num_layers=1, num_heads=32, num_kv_heads=32,
                      head_dim=128, vocab_size=32000)
GQA = ModelConfig(hidden_size=4096, intermediate_size=14336, num_layers=1, num_heads=32, num_kv_heads=8,
                  head_dim=128, vocab_size=32000)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("decode", [True, False])
@ADAPTER_DTYPES
def test_gpu_lora_llama7b(dtype, decode, adapter_dtype):
    gen = torch.Generator().manual_seed(21)
    ranks = [8, 16, 32, 64, 128, 24]
    allm = tuple(TARGET_MODULES)
    mods = [allm, allm, ("q_proj", "v_proj"), allm, allm, ("q_proj", "o_proj", "down_proj")]
    if decode:
        lens = [1] * 40
    else:
        lens = [300, 1, 77, 512, 5, 129, 1, 64]
    pick = [(i % 7) - 1 for i in range(len(lens))]   # -1 = base, 0..5 adapters
    tol = 2e-3 if dtype == torch.float16 else 1.5e-2
    _check_lora(LLAMA7B, dtype, lens, pick, ranks, mods, ("q_proj", "v_proj", "gate_proj", "down_proj"), 0,
                tol, gen, block_tokens=16, adapter_dtype=adapter_dtype)


@gpu
@needs_cuda
@DECODE_VARIANTS
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@ADAPTER_DTYPES
def test_gpu_decode_variants_llama7b(variant, dtype, adapter_dtype, monkeypatch):
    """The decode schedule's TUNE variants at Llama-7B shapes, 80 tokens: int8 rows take their
    own tiles from 64 tokens, so both tile families run."""
    _decode_variant(monkeypatch, variant)
    gen = torch.Generator().manual_seed(22)
    ranks = [8, 16, 32, 64, 128, 24]
    allm = tuple(TARGET_MODULES)
    mods = [allm, allm, ("q_proj", "v_proj"), allm, allm, ("q_proj", "o_proj", "down_proj")]
    pick = [(i % 7) - 1 for i in range(80)]
    tol = 2e-3 if dtype == torch.float16 else 1.5e-2
    _check_lora(LLAMA7B, dtype, [1] * len(pick), pick, ranks, mods, ("q_proj", "v_proj", "gate_proj", "down_proj"), 0,
                tol, gen, block_tokens=16, adapter_dtype=adapter_dtype)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@ADAPTER_DTYPES
def test_gpu_lora_grouped_llama7b(dtype, adapter_dtype):
    """Grouped decode at Llama-7B shapes: 200 tokens sorted by adapter, runs of uneven length."""
    gen = torch.Generator().manual_seed(23)
    ranks = [8, 16, 32, 64, 128, 24]
    allm = tuple(TARGET_MODULES)
    mods = [allm, allm, ("q_proj", "v_proj"), allm, allm, ("q_proj", "o_proj", "down_proj")]
    pick = sorted(int(p) for p in torch.randint(-1, 6, (200,), generator=gen))
    tol = 2e-3 if dtype == torch.float16 else 1.5e-2
    _check_lora(LLAMA7B, dtype, [1] * len(pick), pick, ranks, mods, ("q_proj", "v_proj", "gate_proj", "down_proj"),
                0, tol, gen, block_tokens=16, grouped=True, adapter_dtype=adapter_dtype)


@gpu
@needs_cuda
@pytest.mark.parametrize("schedule", ["decode", "grouped", "prefill"])
@pytest.mark.parametrize("cfg", [LLAMA7B, GQA], ids=["mha", "gqa"])
@ADAPTER_DTYPES
def test_gpu_lora_fused_modules(schedule, cfg, adapter_dtype):
    """q/k/v and gate/up in one launch at Llama-7B and Llama-3-8B (8 KV heads) shapes."""
    gen = torch.Generator().manual_seed(24)
    ranks = [8, 16, 32, 64, 128, 24]
    allm = tuple(TARGET_MODULES)
    mods = [allm, allm, ("q_proj", "v_proj"), allm, allm, ("q_proj", "o_proj", "up_proj")]
    if schedule == "prefill":
        lens = [300, 1, 77, 512, 5, 129, 1, 64]
        pick = [(i % 7) - 1 for i in range(len(lens))]
    else:
        pick = [int(p) for p in torch.randint(-1, 6, (200,), generator=gen)]
        if schedule == "grouped":
            pick.sort()
        lens = [1] * len(pick)
    _check_lora_fused(cfg, torch.float16, lens, pick, ranks, mods, [("q_proj", "k_proj", "v_proj"),
                      ("gate_proj", "up_proj")], 0, 2e-3, gen, block_tokens=16, grouped=schedule == "grouped",
                      adapter_dtype=adapter_dtype)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", [LLAMA7B, GQA], ids=["mha", "gqa"])
@pytest.mark.parametrize("adapter_dtype", [torch.int8, INT4], ids=["rows-int8", "rows-int4"])
def test_gpu_fused_decode_lora(dtype, cfg, adapter_dtype, monkeypatch):
    """The fused decode LoRA (lora_apply's one launch) at Llama-7B and Llama-3-8B shapes on its
    default tiles: 200 tokens, ranks 8..128 and 24, base tokens, an adapter without k or o."""
    launches = _spy_launches(monkeypatch, "_fused_decode_kernel")
    gen = torch.Generator().manual_seed(25)
    allm = tuple(TARGET_MODULES)
    mods = [allm, allm, ("q_proj", "v_proj"), allm, allm, ("q_proj", "o_proj", "up_proj")]
    pick = [int(p) for p in torch.randint(-1, 6, (200,), generator=gen)]
    tol = 2e-3 if dtype == torch.float16 else 1.5e-2
    _check_fused_decode(cfg, dtype, pick, [8, 16, 32, 64, 128, 24], mods, 0, tol, gen, 16, adapter_dtype)
    assert len(launches) == 4


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_norm_rope_llama7b(dtype):
    gen = torch.Generator().manual_seed(23)
    x = torch.randn(300, 4096, generator=gen).to(DEV, dtype)
    w = (1 + 0.1 * torch.randn(4096, generator=gen)).to(DEV, dtype)
    assert rel_err(tnr.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5)) < 1e-2
    qkv = torch.randn(300, 96, 128, generator=gen).to(DEV, dtype)
    ang = torch.rand(300, 64, generator=gen).to(DEV) * 1000
    q = qkv[:, :32]
    assert rel_err(tnr.apply_rope(q, ang.cos(), ang.sin()), ref.apply_rope(q, ang.cos(), ang.sin())) < 1e-2
    _check_add_norm_silu(300, 4096, 11008, dtype, 1e-2, gen)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", [LLAMA7B, GQA], ids=["mha", "gqa"])
def test_gpu_attention(dtype, cfg):
    gen = torch.Generator().manual_seed(22)
    tol = 3e-3 if dtype == torch.float16 else 2e-2
    _check_attn(cfg, dtype, [1] * 6, [1, 17, 300, 1024, 2000, 64], 0, tol, gen, block_tokens=16)   # decode
    _check_attn(cfg, dtype, [1, 1], [4000, 3000], 0, tol, gen, block_tokens=16)                   # split decode
    _check_attn(cfg, dtype, [512, 1, 100, 333], [512, 700, 1000, 333], 0, tol, gen, block_tokens=16)  # prefill


def test_register_report_sees_the_decode_variants():
    """benchmarks/kernel_registers.py compiles decode tiles for sm_90 without a GPU: PIPE turns the
    shrink loop's loads into asynchronous copies through shared memory, a buffer per stage.
    (A subprocess: here the kernels may be loaded for the interpreter, which compiles nothing.)"""
    import pathlib
    import subprocess
    import sys

    if not (pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("Triton's cuobjdump is not installed")
    root = pathlib.Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "kernel_registers.py"), "--tiles",
                          "shrink:8x256w1,shrink:8x256w1p3"], capture_output=True, text=True, env=env, check=True,
                         timeout=300).stdout
    rows = {(r[2], r[1]): [int(c) for c in r[3:]] for r in (line.split() for line in out.splitlines()[1:])}
    regs, smem, copies, warps = rows[("8x256w1", "int8")]
    _, smem3, copies3, _ = rows[("8x256w1p3", "int8")]
    assert 0 < regs <= 255 and 0 < warps <= 64, out
    assert copies == 0 and copies3 > 0 and smem3 >= smem + 2 * 8 * 256, out
