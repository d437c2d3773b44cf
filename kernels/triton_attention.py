"""Paged attention and KV writes in Triton over the unified pool's KV pages.

Same functions as ``kernels.reference.write_kv`` / ``paged_attention``. ``kv`` is the pool's KV
view ``[pages, B, Hkv, D]`` (any strides); sequence s's KV block b of layer l sits in page
``block_tables[s, b, 2l]`` (K) and ``block_tables[s, b, 2l + 1]`` (V). Queries of sequence s are
the last ``q_len`` positions of its context of ``context_lens[s]`` tokens, causal; query head h
reads KV head ``h // (Hq // Hkv)``.

* decode (``batch.max_q_len == 1``): one program per (sequence, KV head, KV split); the query
  heads sharing a KV head form the rows of one ``tl.dot`` so K/V are read once per group;
  online softmax over the split's keys; when the grid would not fill the machine the context is
  split (flash-decoding) and a second small kernel merges the partial results.
* prefill: flash attention per (sequence, query tile, query head), K/V pages read through the
  block table, causal mask with the query's absolute position (works with a cached prefix,
  context_len > q_len); key tiles past the query tile's last position are never read.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_tune import apply_overrides  # noqa: I001
from kernels.batch import AttnBatch

_LOG2E = 1.4426950408889634
_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": keeps exp2(m_old - m_new) defined on empty tiles


# Tile choices on CUDA (the benchmark's --sweep overrides these to compare variants).
TUNE = {
    # Picked on an H100 (2026-11-25, benchmarks/bench_kernels.py --sweep); the GPU tests ran with these.
    "decode": dict(BLOCK_N=64, num_warps=4, num_stages=2, min_programs_per_sm=1),
    "prefill": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
}
apply_overrides("attention", TUNE)


@triton.jit
def _rope_write_kv_kernel(qkv_ptr, sqkv, c_ptr, sc, s_ptr, ss, q_ptr, sq0, sq1,
                          kv_ptr, skv0, skv1, skv2, skv3, pages_ptr, sp0, offs_ptr, layer, HQ, HKV, D2,
                          BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # one program per (token, block of heads); heads run over q, then k, then v of the fused row
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    is_q = h < HQ
    is_k = (h >= HQ) & (h < HQ + HKV)
    is_kv = (h >= HQ) & (h < HQ + 2 * HKV)
    dm = (d < D2)[None, :]
    src = qkv_ptr + t * sqkv + h[:, None] * (2 * D2) + d[None, :]
    live = (is_q | is_kv)[:, None] & dm
    x1 = tl.load(src, mask=live, other=0.0).to(tl.float32)
    x2 = tl.load(src + D2, mask=live, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + t * sc + d, mask=d < D2, other=0.0).to(tl.float32)[None, :]
    s = tl.load(s_ptr + t * ss + d, mask=d < D2, other=0.0).to(tl.float32)[None, :]
    rot = (h < HQ + HKV)[:, None]               # q and k rotate; v is stored as it is
    y1 = tl.where(rot, x1 * c - x2 * s, x1)
    y2 = tl.where(rot, x2 * c + x1 * s, x2)
    qd = q_ptr + t * sq0 + h[:, None] * sq1 + d[None, :]
    qm = is_q[:, None] & dm
    tl.store(qd, y1.to(q_ptr.dtype.element_ty), mask=qm)
    tl.store(qd + D2, y2.to(q_ptr.dtype.element_ty), mask=qm)
    # k and v: the token's K page and V page of this layer, at its slot in the block
    page = tl.load(pages_ptr + t * sp0 + 2 * layer + tl.where(is_k, 0, 1), mask=is_kv, other=0).to(tl.int64)
    off = tl.load(offs_ptr + t).to(tl.int64)
    head = tl.where(is_k, h - HQ, h - HQ - HKV)
    kd = kv_ptr + page[:, None] * skv0 + off * skv1 + head[:, None] * skv2 + d[None, :] * skv3
    km = is_kv[:, None] & dm
    # rounded to q's dtype first, as the reference's rotate-then-store does
    tl.store(kd, y1.to(q_ptr.dtype.element_ty).to(kv_ptr.dtype.element_ty), mask=km)
    tl.store(kd + D2 * skv3, y2.to(q_ptr.dtype.element_ty).to(kv_ptr.dtype.element_ty), mask=km)


def rope_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: torch.Tensor, layer: int,
                  batch: AttnBatch, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """kernels.reference.rope_write_kv in one kernel: rotate q and k of the fused qkv output
    [T, (Hq + 2 Hkv) * D], store k and v in their pages, return q [T, Hq, D]: one launch per layer
    where the rope and KV-write kernels were two."""
    T = qkv.shape[0]
    D = kv.shape[-1]
    assert qkv.stride(1) == 1 and qkv.shape[1] == (num_heads + 2 * num_kv_heads) * D
    q = torch.empty(T, num_heads, D, dtype=qkv.dtype, device=qkv.device)
    if T == 0:
        return q
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    D2 = D // 2
    BLOCK_D = triton.next_power_of_2(D2)
    H = num_heads + 2 * num_kv_heads
    BLOCK_H = max(1, min(triton.next_power_of_2(H), 4096 // BLOCK_D))
    tp = batch.token_pages
    _rope_write_kv_kernel[(T, triton.cdiv(H, BLOCK_H))](
        qkv, qkv.stride(0), cos, cos.stride(0), sin, sin.stride(0), q, q.stride(0), q.stride(1),
        kv, kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3), tp, tp.stride(0), batch.token_offsets,
        layer, num_heads, num_kv_heads, D2, BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D, num_warps=4)
    return q


@triton.jit
def _write_kv_kernel(k_ptr, sk0, sk1, sk2, v_ptr, sv0, sv1, sv2, kv_ptr, skv0, skv1, skv2, skv3,
                     pages_ptr, sp0, offs_ptr, layer, H, D,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    hb = tl.program_id(1)
    pk = tl.load(pages_ptr + t.to(tl.int64) * sp0 + 2 * layer).to(tl.int64)
    pv = tl.load(pages_ptr + t.to(tl.int64) * sp0 + 2 * layer + 1).to(tl.int64)
    off = tl.load(offs_ptr + t).to(tl.int64)
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h < H)[:, None] & (d < D)[None, :]
    src = h[:, None] * sk1 + d[None, :] * sk2
    kk = tl.load(k_ptr + t.to(tl.int64) * sk0 + src, mask=mask)
    srcv = h[:, None] * sv1 + d[None, :] * sv2
    vv = tl.load(v_ptr + t.to(tl.int64) * sv0 + srcv, mask=mask)
    dst = off * skv1 + h[:, None] * skv2 + d[None, :] * skv3
    tl.store(kv_ptr + pk * skv0 + dst, kk.to(kv_ptr.dtype.element_ty), mask=mask)
    tl.store(kv_ptr + pv * skv0 + dst, vv.to(kv_ptr.dtype.element_ty), mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor, layer: int, batch: AttnBatch) -> None:
    """Store the new tokens' K and V ([T, Hkv, D]) into their pages of ``kv`` [pages, B, Hkv, D]."""
    T, H, D = k.shape
    if T == 0:
        return
    BLOCK_D = triton.next_power_of_2(D)
    BLOCK_H = max(1, min(triton.next_power_of_2(H), 4096 // BLOCK_D))
    tp = batch.token_pages
    grid = (T, triton.cdiv(H, BLOCK_H))
    _write_kv_kernel[grid](k, k.stride(0), k.stride(1), k.stride(2), v, v.stride(0), v.stride(1), v.stride(2),
                           kv, kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3),
                           tp, tp.stride(0), batch.token_offsets, layer, H, D,
                           BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D, num_warps=4)


# ---------------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------------
@triton.jit
def _decode_kernel(q_ptr, sq0, sq1, sq2, kv_ptr, skv0, skv1, skv2, skv3, bt_ptr, sbt0, sbt1, sbt2,
                   qind_ptr, ctx_ptr, out_ptr, so0, so1, so2, ws_acc_ptr, ws_ml_ptr,
                   layer, qk_scale, B, D, G,
                   SPLITS: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    s = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    ctx = tl.load(ctx_ptr + s)
    qrow = tl.load(qind_ptr + s).to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gmask = g < G
    dmask = d < D
    qh = h * G + g
    q = tl.load(q_ptr + qrow * sq0 + qh[:, None] * sq1 + d[None, :] * sq2,
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    # each split takes an equal share of this sequence's own context: the split count is fixed
    # per launch (and per CUDA graph, which captures it for the longest context it allows), so a
    # chunk sized from that maximum would leave one split walking a short context alone
    chunk = tl.cdiv(tl.cdiv(ctx, BLOCK_N), SPLITS) * BLOCK_N
    n_start = sp * chunk
    n_end = tl.minimum(ctx, n_start + chunk)
    m_i = tl.full([BLOCK_G], _NEG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    bt_row = bt_ptr + s.to(tl.int64) * sbt0 + 2 * layer * sbt2
    for n0 in range(n_start, n_end, BLOCK_N):
        pos = n0 + offs_n
        pmask = pos < n_end
        blk = pos // B
        kpage = tl.load(bt_row + blk * sbt1, mask=pmask, other=0).to(tl.int64)
        vpage = tl.load(bt_row + blk * sbt1 + sbt2, mask=pmask, other=0).to(tl.int64)
        inpage = (pos % B) * skv1 + h * skv2
        lmask = pmask[:, None] & dmask[None, :]
        k = tl.load(kv_ptr + kpage[:, None] * skv0 + inpage[:, None] + d[None, :] * skv3, mask=lmask, other=0.0)
        v = tl.load(kv_ptr + vpage[:, None] * skv0 + inpage[:, None] + d[None, :] * skv3, mask=lmask, other=0.0)
        if IEEE:
            qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k.to(q.dtype)))
        qk = tl.where(pmask[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    if SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(out_ptr + qrow * so0 + qh[:, None] * so1 + d[None, :] * so2, out.to(out_ptr.dtype.element_ty),
                 mask=gmask[:, None] & dmask[None, :])
    else:
        # partials: ws_acc [S, Hq, SPLITS, BLOCK_D], ws_ml [S, Hq, SPLITS, 2]
        Hq = tl.num_programs(1) * G
        base = (s.to(tl.int64) * Hq + qh) * SPLITS + sp
        tl.store(ws_acc_ptr + base[:, None] * BLOCK_D + d[None, :], acc, mask=gmask[:, None])
        tl.store(ws_ml_ptr + base * 2, m_i, mask=gmask)
        tl.store(ws_ml_ptr + base * 2 + 1, l_i, mask=gmask)


@triton.jit
def _decode_merge_kernel(ws_acc_ptr, ws_ml_ptr, qind_ptr, out_ptr, so0, so1, so2, Hq, D,
                         SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
    s = tl.program_id(0)
    hq = tl.program_id(1)
    qrow = tl.load(qind_ptr + s).to(tl.int64)
    sp = tl.arange(0, SPLITS)
    d = tl.arange(0, BLOCK_D)
    base = (s.to(tl.int64) * Hq + hq) * SPLITS + sp
    m = tl.load(ws_ml_ptr + base * 2)
    l = tl.load(ws_ml_ptr + base * 2 + 1)
    acc = tl.load(ws_acc_ptr + base[:, None] * BLOCK_D + d[None, :])
    mx = tl.max(m, axis=0)
    w = tl.exp2(m - mx)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + qrow * so0 + hq * so1 + d * so2, out.to(out_ptr.dtype.element_ty), mask=d < D)


# ---------------------------------------------------------------------------------------------
# prefill
# ---------------------------------------------------------------------------------------------
@triton.jit
def _prefill_kernel(q_ptr, sq0, sq1, sq2, kv_ptr, skv0, skv1, skv2, skv3, bt_ptr, sbt0, sbt1, sbt2,
                    qind_ptr, ctx_ptr, out_ptr, so0, so1, so2,
                    layer, qk_scale, B, D, G, IEEE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    s = tl.program_id(0)
    mt = tl.program_id(1)
    hq = tl.program_id(2)
    q0 = tl.load(qind_ptr + s)
    q1 = tl.load(qind_ptr + s + 1)
    qlen = q1 - q0
    if mt * BLOCK_M >= qlen:
        return
    ctx = tl.load(ctx_ptr + s)
    h = hq // G
    mi = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = mi < qlen
    qpos = ctx - qlen + mi
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    rows = (q0 + mi).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * sq0 + hq * sq1 + d[None, :] * sq2,
                mask=mmask[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], _NEG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    bt_row = bt_ptr + s.to(tl.int64) * sbt0 + 2 * layer * sbt2
    n_end = tl.minimum(ctx, ctx - qlen + (mt + 1) * BLOCK_M)   # keys past the tile's last query: never seen
    for n0 in range(0, n_end, BLOCK_N):
        pos = n0 + offs_n
        pmask = pos < n_end
        blk = pos // B
        kpage = tl.load(bt_row + blk * sbt1, mask=pmask, other=0).to(tl.int64)
        vpage = tl.load(bt_row + blk * sbt1 + sbt2, mask=pmask, other=0).to(tl.int64)
        inpage = (pos % B) * skv1 + h * skv2
        lmask = pmask[:, None] & dmask[None, :]
        k = tl.load(kv_ptr + kpage[:, None] * skv0 + inpage[:, None] + d[None, :] * skv3, mask=lmask, other=0.0)
        v = tl.load(kv_ptr + vpage[:, None] * skv0 + inpage[:, None] + d[None, :] * skv3, mask=lmask, other=0.0)
        if IEEE:
            qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k.to(q.dtype)))
        causal = (pos[None, :] <= qpos[:, None]) & pmask[None, :]
        qk = tl.where(causal, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + rows[:, None] * so0 + hq * so1 + d[None, :] * so2, out.to(out_ptr.dtype.element_ty),
             mask=mmask[:, None] & dmask[None, :])


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def paged_attention(q: torch.Tensor, kv: torch.Tensor, layer: int, batch: AttnBatch,
                    scale: float) -> torch.Tensor:
    """Causal attention of each sequence's query tokens over its paged KV (incl. the new tokens).
    q: [T, Hq, D] -> [T, Hq, D]. Grouped-query: query head h reads KV head h // (Hq // Hkv)."""
    T, Hq, D = q.shape
    Hkv = kv.shape[2]
    B = kv.shape[1]
    G = Hq // Hkv
    out = torch.empty_like(q)
    S = batch.context_lens.numel()
    if T == 0 or S == 0:
        return out
    BLOCK_D = triton.next_power_of_2(D)
    qk_scale = float(scale) * _LOG2E
    ieee = q.dtype == torch.float32
    bt = batch.block_tables
    interp = q.device.type != "cuda"
    if batch.max_q_len <= 1:
        cfg = TUNE["decode"]
        BLOCK_G = max(16, triton.next_power_of_2(G))
        BLOCK_N = 16 if interp else (cfg["BLOCK_N"] if BLOCK_D <= 128 else min(32, cfg["BLOCK_N"]))
        n_tiles = triton.cdiv(max(batch.max_context, 1), BLOCK_N)
        # flash-decoding: split the context when sequences x KV heads alone leave SMs idle
        want = cfg["min_programs_per_sm"] * _num_sms(q.device)
        splits = 1
        while S * Hkv * splits < want and splits * 2 <= n_tiles and splits < 64:
            splits *= 2
        if splits > 1:
            ws_acc = torch.empty(S, Hq, splits, BLOCK_D, dtype=torch.float32, device=q.device)
            ws_ml = torch.empty(S, Hq, splits, 2, dtype=torch.float32, device=q.device)
        else:
            ws_acc = ws_ml = out  # unused
        _decode_kernel[(S, Hkv, splits)](
            q, q.stride(0), q.stride(1), q.stride(2), kv, kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3),
            bt, bt.stride(0), bt.stride(1), bt.stride(2), batch.q_indptr, batch.context_lens,
            out, out.stride(0), out.stride(1), out.stride(2), ws_acc, ws_ml,
            layer, qk_scale, B, D, G, SPLITS=splits, IEEE=ieee,
            BLOCK_G=BLOCK_G, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        if splits > 1:
            _decode_merge_kernel[(S, Hq)](ws_acc, ws_ml, batch.q_indptr, out, out.stride(0), out.stride(1),
                                          out.stride(2), Hq, D, SPLITS=splits, BLOCK_D=BLOCK_D, num_warps=4)
    else:
        cfg = TUNE["prefill"]
        if interp:
            BLOCK_M, BLOCK_N = 16, 16
        else:
            BLOCK_M, BLOCK_N = cfg["BLOCK_M"], (cfg["BLOCK_N"] if BLOCK_D <= 128 else min(32, cfg["BLOCK_N"]))
        grid = (S, triton.cdiv(batch.max_q_len, BLOCK_M), Hq)
        _prefill_kernel[grid](
            q, q.stride(0), q.stride(1), q.stride(2), kv, kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3),
            bt, bt.stride(0), bt.stride(1), bt.stride(2), batch.q_indptr, batch.context_lens,
            out, out.stride(0), out.stride(1), out.stride(2),
            layer, qk_scale, B, D, G, IEEE=ieee,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=cfg["num_warps"] if not interp else 4,
            num_stages=cfg["num_stages"])
    return out


__all__ = ["write_kv", "paged_attention"]
