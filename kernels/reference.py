"""Pure-torch references for every kernel. On a CPU the engine runs these; the Triton
kernels in kernels/triton_*.py must compute the same functions (tests compare them).

Adapter weights are read in place from the unified pool (server/pool.py): row j of a matrix
whose rows start at table entry ``start`` is ``flat[rows[start + j] : rows[start + j] + width]``.
``meta`` is one (layer, module) view of the adapter index table: int32 [slots, 4] =
(A row start, B^T row start, A rows, B^T rows); the two ranks differ only when tensor parallelism
splits A by rank (server/tp.py), and 0 means the adapter does not target that module. An int8
``flat`` holds quantized rows: row j is ``flat[...] * row_scale[start + j]``. A uint8 ``flat``
holds int4 rows, two weights to a byte (server/pool.py: column 2i in the low nibble), so row j's
weights are the ``ceil(width / 2)`` bytes from ``rows[start + j]``, unpacked, times its scale.
"""
from __future__ import annotations

import torch

from kernels.batch import AttnBatch, LoraBatch


def unpack_int4(b: torch.Tensor, width: int) -> torch.Tensor:
    """int4 rows as stored (uint8 [n, ceil(width / 2)], column 2i in the low nibble, both nibbles
    two's complement) -> int8 [n, width]."""
    s = b.view(torch.int8)
    return torch.stack([(s << 4) >> 4, s >> 4], dim=-1).reshape(b.shape[0], -1)[:, :width]


def gather_rows(flat: torch.Tensor, rows: torch.Tensor, start: int, r: int, width: int,
                row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Rows start..start+r of the row table as an [r, width] matrix (a gather, not a copy loop);
    int8 and int4 rows come back dequantized, in fp32."""
    offs = rows[start:start + r]
    int4 = flat.dtype == torch.uint8
    m = flat[offs[:, None] + torch.arange((width + 1) // 2 if int4 else width, device=flat.device)]
    if int4:
        m = unpack_int4(m, width)
    if flat.dtype in (torch.int8, torch.uint8):
        m = m.float() * row_scale[start:start + r, None]
    return m


def lora_shrink(x: torch.Tensor, flat: torch.Tensor, rows: torch.Tensor, meta: torch.Tensor,
                batch: LoraBatch, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """v[t, :r] = x[t] @ A_slot(t)^T; zeros past the adapter's rank and for base tokens.

    x: [T, d_in]; returns [T, batch.max_rank] in x's dtype (fp32 accumulation). Several modules
    reading the same x: meta [slots, M, 4] returns [T, M, batch.max_rank].
    """
    if meta.dim() == 3:
        return torch.stack([lora_shrink(x, flat, rows, meta[:, m], batch, row_scale) for m in range(meta.shape[1])],
                           dim=1)
    T, d_in = x.shape
    v = torch.zeros(T, batch.max_rank, dtype=x.dtype, device=x.device)
    for s0, s1, slot in batch.seg_host:
        if slot < 0:
            continue
        a0, _, r, _ = (int(z) for z in meta[slot])
        if r == 0:
            continue
        A = gather_rows(flat, rows, a0, r, d_in, row_scale)
        v[s0:s1, :r] = (x[s0:s1].float() @ A.float().t()).to(x.dtype)
    return v


def lora_expand(y: torch.Tensor, v: torch.Tensor, flat: torch.Tensor, rows: torch.Tensor,
                meta: torch.Tensor, scaling: torch.Tensor, batch: LoraBatch,
                widths: tuple[int, ...] | None = None, row_scale: torch.Tensor | None = None) -> None:
    """y[t] += scaling[slot] * v[t, :r] @ B_slot(t)^T, in place. y: [T, d_out] (may be a view).

    Several modules: meta [slots, M, 4], v [T, M, R]; module m adds into the ``widths[m]`` columns
    after those of modules 0..m-1.
    """
    if meta.dim() == 3:
        off = 0
        for m, w in enumerate(widths):
            lora_expand(y[:, off:off + w], v[:, m], flat, rows, meta[:, m], scaling, batch, row_scale=row_scale)
            off += w
        return
    T, d_out = y.shape
    for s0, s1, slot in batch.seg_host:
        if slot < 0:
            continue
        _, b0, _, r = (int(z) for z in meta[slot])
        if r == 0:
            continue
        Bt = gather_rows(flat, rows, b0, r, d_out, row_scale)
        delta = (v[s0:s1, :r].float() @ Bt.float()) * scaling[slot].float()
        y[s0:s1] += delta.to(y.dtype)


def write_kv(k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor, layer: int, batch: AttnBatch) -> None:
    """Store the new tokens' K and V ([T, Hkv, D]) into their pages of ``kv`` [pages, B, Hkv, D]."""
    off = batch.token_offsets.long()
    kv[batch.token_pages[:, 2 * layer].long(), off] = k.to(kv.dtype)
    kv[batch.token_pages[:, 2 * layer + 1].long(), off] = v.to(kv.dtype)


def rope_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: torch.Tensor, layer: int,
                  batch: AttnBatch, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """The fused q|k|v projection output [T, (Hq + 2 Hkv) * D]: rotate q and k (RoPE), store k
    and v in their KV pages, return the rotated q [T, Hq, D]. One kernel on the GPU for three."""
    T = qkv.shape[0]
    D = kv.shape[-1]
    qk = apply_rope(qkv[:, :(num_heads + num_kv_heads) * D].view(T, num_heads + num_kv_heads, D), cos, sin)
    write_kv(qk[:, num_heads:], qkv[:, (num_heads + num_kv_heads) * D:].view(T, num_kv_heads, D), kv, layer, batch)
    return qk[:, :num_heads]


def gather_kv(kv: torch.Tensor, block_tables: torch.Tensor, seq: int, layer: int, n: int):
    """A sequence's first n K and V of one layer as contiguous [n, Hkv, D] tensors."""
    B = kv.shape[1]
    nb = -(-n // B)
    bt = block_tables[seq, :nb].long()
    k = kv[bt[:, 2 * layer]].reshape(nb * B, *kv.shape[2:])[:n]
    v = kv[bt[:, 2 * layer + 1]].reshape(nb * B, *kv.shape[2:])[:n]
    return k, v


def paged_attention(q: torch.Tensor, kv: torch.Tensor, layer: int, batch: AttnBatch,
                    scale: float) -> torch.Tensor:
    """Causal attention of each sequence's query tokens over its paged KV (incl. the new tokens).

    q: [T, Hq, D] -> [T, Hq, D]. Grouped-query: query head h reads KV head h // (Hq // Hkv).
    """
    T, Hq, D = q.shape
    Hkv = kv.shape[2]
    out = torch.empty_like(q)
    for s, (q0, q1, n) in enumerate(batch.q_host):
        k, v = gather_kv(kv, batch.block_tables, s, layer, n)
        k = k.float().repeat_interleave(Hq // Hkv, dim=1)    # [n, Hq, D]
        v = v.float().repeat_interleave(Hq // Hkv, dim=1)
        qs = q[q0:q1].float()                                 # [m, Hq, D]
        m = q1 - q0
        scores = torch.einsum("mhd,nhd->hmn", qs, k) * scale
        # query i sits at position n - m + i and sees keys 0..n-m+i
        qpos = torch.arange(n - m, n, device=q.device)[:, None]
        mask = torch.arange(n, device=q.device)[None, :] > qpos
        scores.masked_fill_(mask[None], float("-inf"))
        out[q0:q1] = torch.einsum("hmn,nhd->mhd", scores.softmax(-1), v).to(q.dtype)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def add_rms_norm(x: torch.Tensor, d: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The residual add and the next norm: x += d in place (rounded to x's dtype), then
    rms_norm(x). One kernel on the GPU where torch runs two (and reads x twice)."""
    x.add_(d)
    return rms_norm(x, weight, eps)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gate: silu(gate) * up, where gu = [gate | up] along the last dim (the fused GEMM)."""
    i = gu.shape[-1] // 2
    return torch.nn.functional.silu(gu[..., :i]) * gu[..., i:]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the Hugging Face Llama convention). x: [T, H, D]; cos/sin: [T, D/2]."""
    d2 = x.shape[-1] // 2
    x1, x2 = x[..., :d2].float(), x[..., d2:].float()
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ w^T (+ bias): the base model's projections."""
    return torch.nn.functional.linear(x, w, bias)


def silu_mul_linear(gu: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation and down projection: linear(silu_mul(gu), w)."""
    return linear(silu_mul(gu), w)


def lora_apply(y: torch.Tensor, x: torch.Tensor, flat: torch.Tensor, rows: torch.Tensor, meta: torch.Tensor,
               scaling: torch.Tensor, batch: LoraBatch, widths: tuple[int, ...] | None = None,
               row_scale: torch.Tensor | None = None) -> None:
    """y += the LoRA delta of x, in place: lora_shrink then lora_expand (a Triton backend may run
    the two as one launch)."""
    v = lora_shrink(x, flat, rows, meta, batch, row_scale)
    lora_expand(y, v, flat, rows, meta, scaling, batch, widths, row_scale)
