"""RMSNorm and rotate-half RoPE in Triton: the same functions as kernels.reference.rms_norm /
apply_rope (one program per row; fp32 math, rounding where the reference rounds)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, sx, w_ptr, o_ptr, so, H, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < H
    x = tl.load(x_ptr + row * sx + offs, mask=m, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
    n = (x * rstd).to(x_ptr.dtype.element_ty)            # the reference rounds to x's dtype here
    w = tl.load(w_ptr + offs, mask=m, other=0.0)
    tl.store(o_ptr + row * so + offs, (n.to(tl.float32) * w.to(tl.float32)).to(o_ptr.dtype.element_ty), mask=m)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    H = x.shape[-1]
    x2 = x.reshape(-1, H)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.result_type(x, weight), device=x.device)
    if x2.shape[0]:
        BLOCK = triton.next_power_of_2(H)
        _rms_norm_kernel[(x2.shape[0],)](x2, x2.stride(0), weight.contiguous(), out, out.stride(0), H, float(eps),
                                         BLOCK=BLOCK, num_warps=8 if BLOCK >= 4096 else 4)
    return out.view(*x.shape[:-1], H)


@triton.jit
def _rope_kernel(x_ptr, sx0, sx1, sx2, c_ptr, sc0, s_ptr, ss0, o_ptr, so0, so1, H, D2,
                 BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    dm = d < D2
    m = (h < H)[:, None] & dm[None, :]
    c = tl.load(c_ptr + t * sc0 + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    s = tl.load(s_ptr + t * ss0 + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    base = x_ptr + t * sx0 + h[:, None] * sx1
    x1 = tl.load(base + d[None, :] * sx2, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(base + (d[None, :] + D2) * sx2, mask=m, other=0.0).to(tl.float32)
    ob = o_ptr + t * so0 + h[:, None] * so1
    tl.store(ob + d[None, :], (x1 * c - x2 * s).to(o_ptr.dtype.element_ty), mask=m)
    tl.store(ob + d[None, :] + D2, (x2 * c + x1 * s).to(o_ptr.dtype.element_ty), mask=m)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; cos/sin: [T, D/2] -> new [T, H, D] in x's dtype."""
    T, H, D = x.shape
    out = torch.empty(T, H, D, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    D2 = D // 2
    _rope_kernel[(T,)](x, x.stride(0), x.stride(1), x.stride(2), cos, cos.stride(0), sin, sin.stride(0),
                       out, out.stride(0), out.stride(1), H, D2,
                       BLOCK_H=triton.next_power_of_2(H), BLOCK_D=triton.next_power_of_2(D2), num_warps=4)
    return out
