"""RMSNorm (alone and fused with the residual add before it), SwiGLU's silu(gate) * up, and
rotate-half RoPE in Triton: the same functions as kernels.reference.rms_norm / add_rms_norm /
silu_mul / apply_rope (fp32 math, rounding where the reference rounds)."""
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
def _add_rms_norm_kernel(x_ptr, sx, d_ptr, sd, w_ptr, o_ptr, so, H, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < H
    xs = x_ptr + row * sx + offs
    d = tl.load(d_ptr + row * sd + offs, mask=m, other=0.0).to(tl.float32)
    x = (tl.load(xs, mask=m, other=0.0).to(tl.float32) + d).to(x_ptr.dtype.element_ty)
    tl.store(xs, x, mask=m)                               # the residual stream, rounded as torch's add
    x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
    n = (x * rstd).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + offs, mask=m, other=0.0)
    tl.store(o_ptr + row * so + offs, (n.to(tl.float32) * w.to(tl.float32)).to(o_ptr.dtype.element_ty), mask=m)


def add_rms_norm(x: torch.Tensor, d: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x += d in place, then rms_norm(x) (x: [T, H] with unit column stride)."""
    T, H = x.shape
    assert x.stride(1) == 1, "the residual stream is updated in place: it must be row-contiguous"
    d = d if d.stride(-1) == 1 else d.contiguous()
    out = torch.empty(T, H, dtype=torch.result_type(x, weight), device=x.device)
    if T:
        BLOCK = triton.next_power_of_2(H)
        _add_rms_norm_kernel[(T,)](x, x.stride(0), d, d.stride(0), weight.contiguous(), out, out.stride(0), H,
                                   float(eps), BLOCK=BLOCK, num_warps=8 if BLOCK >= 4096 else 4)
    return out


@triton.jit
def _silu_mul_kernel(g_ptr, sg, o_ptr, so, I, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < I
    g = tl.load(g_ptr + row * sg + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(g_ptr + row * sg + I + offs, mask=m, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(o_ptr.dtype.element_ty).to(tl.float32)   # torch rounds silu's output
    tl.store(o_ptr + row * so + offs, (s * u).to(o_ptr.dtype.element_ty), mask=m)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """silu(gu[:, :I]) * gu[:, I:] for gu [T, 2I] (unit column stride) -> [T, I]."""
    T, I2 = gu.shape
    assert gu.stride(1) == 1
    I = I2 // 2
    out = torch.empty(T, I, dtype=gu.dtype, device=gu.device)
    if T:
        BLOCK = min(1024, triton.next_power_of_2(I))
        _silu_mul_kernel[(T, triton.cdiv(I, BLOCK))](gu, gu.stride(0), out, out.stride(0), I, BLOCK=BLOCK,
                                                      num_warps=4)
    return out


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
