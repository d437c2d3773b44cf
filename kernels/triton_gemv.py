"""y = x @ W^T for a handful of tokens (decode at batch 1-16), in Triton.

At one token a linear layer is a pure weight read; from a CUDA graph cuBLAS reaches 63-90% of the
copy bandwidth at Llama-7B's shapes, this kernel 73-100% (benchmarks/results/engine-2026-11-25e-h100/). Here each
program streams a BLOCK_N x K slab of W (rows contiguous, so every load is coalesced) with deep
pipelining; the few tokens ride along, as a broadcast multiply-reduce for one token or a
tensor-core dot (tokens padded to 16) for more.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_norm_rope import silu_mul
from kernels.triton_tune import apply_overrides

MAX_TOKENS = 16

TUNE = {
    # H100 (2026-11-25, benchmarks/bench_gemv.py): narrow row tiles and long K tiles, deeply
    # pipelined, were the best at every Llama-7B shape (gate_up and lm_head at 96-100% of the
    # copy bandwidth, cuBLAS 85-89%). Outputs of 4096 or fewer (o_proj, down_proj) ran best
    # with 4 warps (14.8 and 34.8 us vs 15.6 and 38.5 with 8).
    "gemv": dict(BLOCK_N=4, BLOCK_K=1024, num_warps=8, num_stages=5, narrow_n=4096, narrow_warps=4),
    # the gated down projection (silu(gate) * up computed per tile): each program recomputes the
    # activation for its K range, so wider row tiles share it; the sweep's best at one token
    # (36.2 us vs 36.6 for the activation kernel then the plain GEMV, 38.9 with cuBLAS)
    "gemv_gated": dict(BLOCK_N=8, num_warps=8, num_stages=3, narrow_n=0),
}
apply_overrides("gemv", TUNE)


@triton.jit
def _silu_mul(g, u):
    """silu(g) * u rounded where torch rounds (silu's output, then the product) in g's dtype."""
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    return (s * u.to(tl.float32)).to(g.dtype)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, sxm, swn, sym,
                 HAS_BIAS: tl.constexpr, ONE: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
                 GATED: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    nmask = rn < N
    rn_safe = tl.where(nmask, rn, 0)        # out-of-range rows read row 0, never stored
    w_rows = w_ptr + rn_safe.to(tl.int64)[:, None] * swn
    if ONE:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            w = tl.load(w_rows + rk[None, :])
        else:
            w = tl.load(w_rows + rk[None, :], mask=(rk < K)[None, :], other=0.0)
        if ONE:
            if EVEN_K:
                x = tl.load(x_ptr + rk)
            else:
                x = tl.load(x_ptr + rk, mask=rk < K, other=0.0)
            if GATED:
                x = _silu_mul(x, tl.load(x_ptr + K + rk, mask=rk < K, other=0.0))
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
        else:
            xp = x_ptr + rm[:, None] * sxm + rk[None, :]
            xm = (rm < M)[:, None] & (rk < K)[None, :]
            x = tl.load(xp, mask=xm, other=0.0)
            if GATED:
                x = _silu_mul(x, tl.load(xp + K, mask=xm, other=0.0))
            if IEEE:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
    if ONE:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn_safe).to(tl.float32)
        tl.store(y_ptr + rn, acc.to(y_ptr.dtype.element_ty), mask=nmask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn_safe).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * sym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rm < M)[:, None] & nmask[None, :])


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, gated: bool = False,
         **tune) -> torch.Tensor:
    """x [M, K] (M <= MAX_TOKENS, rows contiguous), w [N, K] (rows contiguous) -> [M, N] in x's dtype.

    gated: x is [M, 2K] = [gate | up] and the product is silu(gate) * up @ w^T (SwiGLU's down
    projection), the activation computed as the weight streams by instead of in its own kernel."""
    M, K = x.shape
    if gated:
        K //= 2
    N = w.shape[0]
    assert M <= MAX_TOKENS and w.shape[1] == K and x.stride(1) == 1 and w.stride(1) == 1
    cfg = {**TUNE["gemv"], **(TUNE["gemv_gated"] if gated else {}), **tune}
    warps = tune.get("num_warps") or (cfg["narrow_warps"] if N <= cfg["narrow_n"] else cfg["num_warps"])
    BN, BK = cfg["BLOCK_N"], min(cfg["BLOCK_K"], triton.next_power_of_2(K))
    if M > 1:                 # tl.dot wants 16 or more columns
        BN, BK = max(BN, 16), min(BK, 256)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(N, BN),)](
        x, w, bias if bias is not None else w, y, M, N, K, x.stride(0), w.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, ONE=M == 1, EVEN_K=K % BK == 0, IEEE=x.dtype == torch.float32, GATED=gated,
        BLOCK_M=16, BLOCK_N=BN, BLOCK_K=BK, num_warps=warps, num_stages=cfg["num_stages"])
    return y


def _graph_gemv(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.is_cuda and x.dim() == 2 and x.shape[0] == 1 and x.stride(-1) == 1 and w.stride(-1) == 1
            and torch.cuda.is_current_stream_capturing())


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through the GEMV above for one token while a CUDA graph is being captured.

    Only there: eagerly, Triton's Python launcher costs ~20-30 us of host time per call against
    cuBLAS's ~5, which an eager step (prefill) pays on the critical path; inside a graph launches
    are free and only the kernel's bandwidth counts. Only at one token: measured from graphs on an
    H100 (benchmarks/bench_gemv.py), the one-token kernel reads a Llama-7B layer's four weights in
    141 us against cuBLAS's 158 (roofline 137), but the tensor-core path for 4-16 tokens loses."""
    if _graph_gemv(x, w):
        return gemv(x, w, bias)
    return torch.nn.functional.linear(x, w, bias)


def silu_mul_linear(gu: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """linear(silu_mul(gu), w): SwiGLU's activation and down projection. At one token inside a
    graph capture one GEMV computes the activation as it streams the weight (the activation
    kernel and its launch gap go: 32 kernels per Llama-7B step); elsewhere the two kernels."""
    if _graph_gemv(gu, w):
        return gemv(gu, w, gated=True)
    return torch.nn.functional.linear(silu_mul(gu), w)
