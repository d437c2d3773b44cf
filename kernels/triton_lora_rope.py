"""The q/k/v LoRA expand with RoPE and the KV write as its epilogue, for decode steps.

A decode step with adapters ran, per layer, ``lora_expand`` (y += s * v @ B^T into the fused
q|k|v GEMM output) and then ``rope_write_kv`` (rotate q and k, store k and v in their pages). The
fused row went out to memory and came back, and the two launches each paid a kernel's fixed cost.
Here one program per (head of the fused row, token) adds its head's LoRA delta to the GEMM's output
in registers, rounds it to the activation dtype (where the two-kernel path stored it), rotates and
stores it: the same function as ``lora_expand`` then ``rope_write_kv``
(``kernels.reference.lora_expand_rope_write_kv``).

The delta is ``_expand_delta``, the decode expand's rank classes, over the head's columns. Batches
that are not plain decode (segments, the grouped schedule) and heads of odd width take the two
kernels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.batch import AttnBatch, LoraBatch
from kernels.triton_attention import rope_write_kv
from kernels.triton_lora import (TUNE, _expand_delta, _pdl_args, _pdl_launch_dependents, _pdl_wait, _quant,
                                 _row_align, lora_expand)


@triton.jit
def _expand_rope_kernel(qkv_ptr, sqkv, v_ptr, sv0, sv1, svm, flat_ptr, rows_ptr, rs_ptr, meta_ptr, sm0, sm1, smm,
                        scale_ptr, slot_ptr, c_ptr, sc, s_ptr, ss, q_ptr, sq0, sq1,
                        kv_ptr, skv0, skv1, skv2, skv3, pages_ptr, sp0, offs_ptr, layer, HQ, HKV, D2,
                        ALIGN: tl.constexpr, QUANT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                        PDL: tl.constexpr):
    # heads are the fast grid axis: one token's heads launch together, so its rows of B^T and its
    # fused row are read in long runs (the decode expand's TILE_FIRST)
    hh = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    _pdl_launch_dependents(PDL)
    mod = (hh >= HQ).to(tl.int32) + (hh >= HQ + HKV).to(tl.int32)      # 0 q, 1 k, 2 v
    head = hh - tl.where(mod == 0, 0, tl.where(mod == 1, HQ, HQ + HKV))
    # the head's columns as two halves (RoPE pairs column d with d + D/2), BLOCK_D wide each
    j = tl.arange(0, 2 * BLOCK_D)
    dd = j % BLOCK_D
    cmask = dd < D2
    col = head * 2 * D2 + (j // BLOCK_D) * D2 + dd                      # in the module's output
    slot = tl.load(slot_ptr + t)
    rank = 0
    b0 = 0
    if slot >= 0:
        mrow = meta_ptr + mod * smm + slot.to(tl.int64) * sm0
        b0 = tl.load(mrow + sm1)
        rank = tl.load(mrow + 3 * sm1)
    _pdl_wait(PDL)    # v (the shrink's) and the fused row (the base GEMM's) from here on
    src = qkv_ptr + t * sqkv + hh * 2 * D2 + (j // BLOCK_D) * D2 + dd
    x = tl.load(src, mask=cmask, other=0.0)
    if rank > 0:
        v_row = v_ptr + t * sv0 + mod * svm
        delta = _expand_delta(flat_ptr, rows_ptr, rs_ptr, v_row, sv1, b0, rank, col, cmask, ALIGN, QUANT, BLOCK_R)
        # rounded where lora_expand stores the fused row
        x = (x.to(tl.float32) + delta * tl.load(scale_ptr + slot)).to(q_ptr.dtype.element_ty)
    x1, x2 = tl.split(tl.permute(tl.reshape(x.to(tl.float32), [2, BLOCK_D]), (1, 0)))
    d = tl.arange(0, BLOCK_D)
    dmask = d < D2
    if mod < 2:       # q and k rotate; v is stored as it is
        c = tl.load(c_ptr + t * sc + d, mask=dmask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + t * ss + d, mask=dmask, other=0.0).to(tl.float32)
        y1 = x1 * c - x2 * s
        y2 = x2 * c + x1 * s
    else:
        y1 = x1
        y2 = x2
    y1 = y1.to(q_ptr.dtype.element_ty)
    y2 = y2.to(q_ptr.dtype.element_ty)
    if mod == 0:
        qd = q_ptr + t * sq0 + head * sq1 + d
        tl.store(qd, y1, mask=dmask)
        tl.store(qd + D2, y2, mask=dmask)
    else:
        # the token's K (or V) page of this layer, at its slot in the block
        page = tl.load(pages_ptr + t * sp0 + 2 * layer + mod - 1).to(tl.int64)
        off = tl.load(offs_ptr + t).to(tl.int64)
        kd = kv_ptr + page * skv0 + off * skv1 + head * skv2 + d * skv3
        tl.store(kd, y1.to(kv_ptr.dtype.element_ty), mask=dmask)
        tl.store(kd + D2 * skv3, y2.to(kv_ptr.dtype.element_ty), mask=dmask)


def lora_expand_rope_write_kv(qkv: torch.Tensor, v: torch.Tensor, flat: torch.Tensor, rows: torch.Tensor,
                              meta: torch.Tensor, scaling: torch.Tensor, batch: LoraBatch, cos: torch.Tensor,
                              sin: torch.Tensor, kv: torch.Tensor, layer: int, attn: AttnBatch, num_heads: int,
                              num_kv_heads: int, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """lora_expand(qkv, v, ..., widths of q, k, v) then rope_write_kv(qkv, ...), as one kernel on
    a decode batch: returns the rotated q [T, Hq, D] and writes k and v into their pages. ``qkv``
    is the fused GEMM output (its values are left as they were on the fused path), ``v`` and
    ``meta`` the q/k/v shrink's [T, 3, R] and [slots, 3, 4]."""
    T = qkv.shape[0]
    D = kv.shape[-1]
    cfg = TUNE["expand_rope"]
    if (not cfg.get("enabled", True) or T == 0 or batch.max_rank == 0 or batch.max_seg_len > 1 or batch.grouped
            or D % 2 or qkv.stride(1) != 1):
        lora_expand(qkv, v, flat, rows, meta, scaling, batch, (num_heads * D, num_kv_heads * D, num_kv_heads * D),
                    row_scale)
        return rope_write_kv(qkv, cos, sin, kv, layer, attn, num_heads, num_kv_heads)
    assert qkv.shape[1] == (num_heads + 2 * num_kv_heads) * D and v.dim() == 3 and meta.dim() == 3
    quant, rs = _quant(flat, rows, row_scale)
    q = torch.empty(T, num_heads, D, dtype=qkv.dtype, device=qkv.device)
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    D2 = D // 2
    tp = attn.token_pages
    sm0, smm, sm1 = meta.stride()
    sv0, svm, sv1 = v.stride()
    grid = (num_heads + 2 * num_kv_heads, T)
    _expand_rope_kernel[grid](
        qkv, qkv.stride(0), v, sv0, sv1, svm, flat, rows, rs, meta, sm0, sm1, smm, scaling, batch.token_slot,
        cos, cos.stride(0), sin, sin.stride(0), q, q.stride(0), q.stride(1),
        kv, kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3), tp, tp.stride(0), attn.token_offsets,
        layer, num_heads, num_kv_heads, D2, ALIGN=_row_align(flat), QUANT=quant, BLOCK_R=cfg["BLOCK_R"],
        BLOCK_D=triton.next_power_of_2(D2), num_warps=cfg["num_warps"], **_pdl_args(cfg, qkv.device))
    return q


__all__ = ["lora_expand_rope_write_kv"]
