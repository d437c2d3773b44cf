"""Decode LoRA shrink and expand for int8 rows on Hopper, in Gluon: a producer warp streams adapter
rows into shared memory with TMA while consumer warps reduce them.

Why not Triton: every decode program of ``kernels/triton_lora.py`` walks a chain of dependent
index loads (item -> slot -> meta -> row offsets) before its rows flow, and Triton's pipelining
turns the whole chain into ``cp.async`` groups, which complete in order, so the chain cannot run
ahead of the data (benchmarks/results/lora-persist-2026-12-03-h200). Here one warp per CTA walks the
chain and issues one TMA copy per row, each completing on its stage's mbarrier whatever was issued
before it; the consumer warps only wait for a stage, reduce it and release it. The bytes in flight
per SM are the stages' shared memory, not the consumers' registers.

Both kernels are persistent (a fixed grid of CTAS_PER_SM CTAs per SM) over a work plan built on
the device once per step (cached on the ``LoraBatch`` like the compact Triton grid's):

* shrink: the compact plan of ``triton_lora._decode_plan`` (items of BR rank rows of one token and
  module, 32 KB of rows at d_in 4096); a stage holds the item's BR rows of A and the token's x.
* expand: ``_expand_plan`` below, items of (token, module, C output columns), ordered by cost
  (stages of RS rank rows), largest first, and dealt to the CTAs in snake order so their shares
  even out; a stage holds RS rows of C columns of B^T.

Requirements (``supported`` checks what the host can see): sm_90+, Triton with Gluon, int8 rows
whose offsets are multiples of 256 bytes (server/pool.py aligns int8 rows so), widths and d_in
multiples of 256, x contiguous. Everything else takes the Triton kernels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.batch import LoraBatch
from kernels.triton_lora import _all_layers, _decode_plan, _max_over_layers

try:  # Gluon ships with Triton 3.4+; the API used here is Triton 3.6's (the GPU image's)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

BOX = 256            # bytes of a TMA box's inner dimension: the pool is viewed as [bytes / 256, 256]

# tiles: triton_lora.TUNE["shrink_gluon"] / ["expand_gluon"] (one table, so the benchmarks' variant
# files override both families of kernels alike)


def _p2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _kbox(d: int) -> int:
    """Boxes of 256 bytes per TMA copy for a run of d bytes: the largest power of two <= 16 that
    divides d / 256 (TMA boxes are powers of two of at most 256 rows)."""
    n = d // BOX
    k = 16
    while n % k:
        k //= 2
    return k


# ---------------------------------------------------------------------------------------------
# the expand's plan (plain Triton: it also runs under the interpreter, so CI tests it)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _expand_code(t, m, c):
    return (t << 12) | (m << 10) | c


@triton.jit
def _expand_fields(e):
    """(token, module, column chunk) of an _expand_code."""
    return e >> 12, (e >> 10) & 3, e & 1023


@triton.jit
def _expand_plan_kernel(slot_ptr, meta_ptr, sm0, sm1, smm, sml, L, items_ptr, n_ptr, T, M, W0, W1, W2,
                        C: tl.constexpr, RS: tl.constexpr, CLASSES: tl.constexpr, NC: tl.constexpr,
                        BLOCK: tl.constexpr):
    """Items (code, slot) of the Gluon expand: for every (token, module) pair with B^T rows in some
    layer, one item per C columns of the module's width; pairs in descending classes of cost
    (stages of RS rows: class k holds 2^(k-1) < stages <= 2^k), token order inside a class."""
    base = 0
    for kk in tl.static_range(CLASSES):
        k = CLASSES - 1 - kk
        for p0 in range(0, T * M, BLOCK):
            p = p0 + tl.arange(0, BLOCK)
            pmask = p < T * M
            t = p // M
            m = p - t * M
            slot = tl.load(slot_ptr + t, mask=pmask, other=-1)
            rank = _max_over_layers(meta_ptr + slot.to(tl.int64) * sm0 + m * smm + 3 * sm1, sml, L,
                                    pmask & (slot >= 0), 8)
            stages = (rank + RS - 1) // RS
            lo: tl.constexpr = 1 if k == 0 else (1 << k) // 2 + 1
            width = tl.where(m == 0, W0, tl.where(m == 1, W1, W2))
            chunks = (width + C - 1) // C
            cnt = tl.where(pmask & (stages >= lo) & (stages <= (1 << k)), chunks, 0)
            first = base + tl.cumsum(cnt, axis=0) - cnt
            for j in tl.static_range(NC):
                ok = j < cnt
                tl.store(items_ptr + 2 * (first + j), _expand_code(t, m, j), mask=ok)
                tl.store(items_ptr + 2 * (first + j) + 1, slot, mask=ok)
            base += tl.sum(cnt, axis=0)
    tl.store(n_ptr, base)


def expand_plan(batch: LoraBatch, meta3: torch.Tensor, widths: tuple[int, ...], C: int, RS: int,
                max_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(items, count) of the Gluon expand for this step, built by one launch and kept on the batch
    (one plan serves every layer: ranks are the max over layers; a layer where a pair has no rows
    makes its items add nothing)."""
    meta4, where = _all_layers(meta3)
    T, M = batch.token_slot.numel(), meta4.shape[2]
    W0, W1, W2 = (tuple(widths) + (0, 0))[:3]
    nc = max(triton.cdiv(w, C) for w in widths)
    classes = max(1, (_p2(triton.cdiv(max_rank, RS))).bit_length())
    key = ("gluon-expand", where, M, tuple(widths), C, RS, classes)
    if key not in batch.plans:
        items = torch.empty(max(1, T * M * nc), 2, dtype=torch.int32, device=meta4.device)
        n = torch.empty(1, dtype=torch.int32, device=meta4.device)
        sm0, sml, smm, sm1 = meta4.stride()
        _expand_plan_kernel[(1,)](batch.token_slot, meta4, sm0, sm1, smm, sml, meta4.shape[1], items, n, T, M,
                                  W0, W1, W2, C=C, RS=RS, CLASSES=classes, NC=nc, BLOCK=min(1024, _p2(T * M)),
                                  num_warps=8)
        batch.plans[key] = items, n
    return batch.plans[key]


if HAVE_GLUON:

    @gluon.jit
    def _i8_to_f32(q):
        """int8 -> fp32 through fp16 bit patterns (see triton_lora._i8_to_f16)."""
        h = (q.to(gl.int16) + 0x6480).to(gl.float16, bitcast=True)
        return (h - 1152.0).to(gl.float32)

    @gluon.jit
    def _item(items_ptr, k, pid, G):
        """Item index of a CTA's k-th turn: snake order (pid, then G - 1 - pid, ...), so a plan sorted
        by cost deals each CTA about the same share."""
        return k * G + gl.where(k % 2 == 0, pid, G - 1 - pid)

    # ---------------------------------------------------------------------------------------------
    # shrink: v[t, m, r] = row_scale * (A row . x[t]) for the BR rows of each plan item
    # ---------------------------------------------------------------------------------------------
    @gluon.jit
    def _shrink_producer(a_desc, x_desc, rows_ptr, meta_ptr, sm0, sm1, smm, items_ptr, n_ptr, a_smem, x_smem,
                         full, empty, BR: gl.constexpr, KBOX: gl.constexpr, NBOX: gl.constexpr,
                         STAGES: gl.constexpr):
        pid = gl.program_id(0)
        G = gl.num_programs(0)
        n = gl.load(n_ptr)
        turns = (n - pid + G - 1) // G
        for k in range(0, turns):
            i = k * G + pid
            e = gl.load(items_ptr + 2 * i)
            slot = gl.load(items_ptr + 2 * i + 1)
            t = e >> 14
            mod = (e >> 12) & 3
            rt = e & 63
            a0 = 0
            rank = 0
            if slot >= 0:
                mrow = meta_ptr + slot.to(gl.int64) * sm0 + mod * smm
                a0 = gl.load(mrow)
                rank = gl.load(mrow + 2 * sm1)
            nrows = gl.minimum(gl.maximum(rank - rt * BR, 0), BR)
            s = k % STAGES
            bar = full.index(s)
            mbarrier.wait(empty.index(s), ((k // STAGES) & 1) ^ 1)
            # BR + 1 arrivals a phase: x's and one per row, with its bytes or (past the rank) none
            mbarrier.expect(bar, x_desc.block_type.nbytes * NBOX, pred=nrows > 0)
            mbarrier.arrive(bar, pred=nrows == 0)
            for b in gl.static_range(NBOX):
                tma.async_copy_global_to_shared(x_desc, [(t * NBOX + b) * KBOX, 0], bar, x_smem.index(s * NBOX + b),
                                                pred=nrows > 0)
            for r in gl.static_range(BR):
                ok = r < nrows
                # the row table is int64; TMA coordinates are int32 (in boxes: a pool of up to 512 GB)
                box = (gl.load(rows_ptr + a0 + rt * BR + r, mask=ok, other=0) // 256).to(gl.int32)
                mbarrier.expect(bar, a_desc.block_type.nbytes * NBOX, pred=ok)
                mbarrier.arrive(bar, pred=r >= nrows)
                for b in gl.static_range(NBOX):
                    tma.async_copy_global_to_shared(a_desc, [box + b * KBOX, 0], bar,
                                                    a_smem.index((s * BR + r) * NBOX + b), pred=ok)

    @gluon.jit
    def _shrink_consumer(a_smem, x_smem, rows_ptr, rs_ptr, meta_ptr, sm0, sm1, smm, items_ptr, n_ptr, v_ptr, sv0,
                         sv1, svm, max_rank, full, empty, BR: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
                         R_P2: gl.constexpr, num_warps: gl.constexpr):
        # each thread: all BR rows x 8 bytes of a chunk of 256 x num_warps columns, so one converted
        # x element serves BR weights; a warp reads 256 contiguous bytes of a row (no bank
        # conflicts); reduced across threads once per item
        L: gl.constexpr = gl.BlockedLayout([BR, 8], [1, 32], [1, num_warps], [1, 0])
        CH: gl.constexpr = 256 * num_warps
        # plain row-major views of the stages (a layout's rank may be one less than its shape's:
        # indexing the first dimension keeps it)
        plain2: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
        plain1: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
        a_all = a_smem._reinterpret(gl.int8, [STAGES, BR, D], plain2)
        x_all = x_smem._reinterpret(x_smem.dtype, [STAGES, D], plain1)
        offs_r = gl.arange(0, BR, layout=gl.SliceLayout(1, L))
        L1: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
        jj = gl.arange(0, R_P2, layout=L1)
        pid = gl.program_id(0)
        G = gl.num_programs(0)
        n = gl.load(n_ptr)
        turns = (n - pid + G - 1) // G
        for k in range(0, turns):
            i = k * G + pid
            e = gl.load(items_ptr + 2 * i)
            slot = gl.load(items_ptr + 2 * i + 1)
            t = e >> 14
            mod = (e >> 12) & 3
            n_tiles = (e >> 6) & 63
            rt = e & 63
            mrow = meta_ptr + gl.maximum(slot, 0).to(gl.int64) * sm0 + mod * smm
            a0 = gl.load(mrow)
            rank = gl.where(slot >= 0, gl.load(mrow + 2 * sm1), 0)
            rr = rt * BR + offs_r
            rmask = rr < rank
            scale = gl.load(rs_ptr + a0 + rr, mask=rmask, other=0.0)
            s = k % STAGES
            mbarrier.wait(full.index(s), (k // STAGES) & 1)
            a_st = a_all.index(s)
            x_st = x_all.index(s)
            acc = gl.zeros([BR, CH], gl.float32, L)
            for c in gl.static_range(D // CH):
                a = a_st.slice(c * CH, CH, dim=1).load(L)
                xv = x_st.slice(c * CH, CH, dim=0).load(gl.SliceLayout(0, L)).to(gl.float32)
                acc += _i8_to_f32(a) * gl.expand_dims(xv, 0)
            # every warp has read the stage before one thread releases it to the producer
            gl.thread_barrier()
            fence_async_shared()
            mbarrier.arrive(empty.index(s))
            out = gl.where(rmask, gl.sum(acc, axis=1) * scale, 0.0)
            v_row = v_ptr + t.to(gl.int64) * sv0 + mod * svm
            gl.store(v_row + rr * sv1, out.to(v_ptr.dtype.element_ty), mask=rr < max_rank)
            # the pair's last tile (or its only, zeros-only item) writes the zeros up to max_rank
            last = rt == gl.maximum(n_tiles, 1) - 1
            gl.store(v_row + jj * sv1, gl.zeros([R_P2], v_ptr.dtype.element_ty, L1),
                     mask=(jj * 0 + last.to(gl.int32) > 0) & (jj >= n_tiles * BR) & (jj < max_rank))

    @gluon.jit
    def _shrink_kernel(a_desc, x_desc, rows_ptr, rs_ptr, meta_ptr, sm0, sm1, smm, items_ptr, n_ptr, v_ptr, sv0, sv1,
                       svm, max_rank, BR: gl.constexpr, KBOX: gl.constexpr, NBOX: gl.constexpr,
                       STAGES: gl.constexpr, R_P2: gl.constexpr, PREGS: gl.constexpr, num_warps: gl.constexpr):
        D: gl.constexpr = KBOX * NBOX * 256
        a_smem = gl.allocate_shared_memory(gl.int8, [STAGES * BR * NBOX, KBOX, 256], a_desc.layout)
        x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES * NBOX, KBOX, 256], x_desc.layout)
        full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(full.index(s), count=BR + 1)
            mbarrier.init(empty.index(s), count=1)
        gl.warp_specialize([
            (_shrink_consumer, (a_smem, x_smem, rows_ptr, rs_ptr, meta_ptr, sm0, sm1, smm, items_ptr, n_ptr, v_ptr,
                                sv0, sv1, svm, max_rank, full, empty, BR, D, STAGES, R_P2, num_warps)),
            (_shrink_producer, (a_desc, x_desc, rows_ptr, meta_ptr, sm0, sm1, smm, items_ptr, n_ptr, a_smem, x_smem,
                                full, empty, BR, KBOX, NBOX, STAGES)),
        ], [1], [PREGS])

    # ---------------------------------------------------------------------------------------------
    # expand: y[t, cols] += scaling[slot] * sum_j v[t, m, j] * row_scale[j] * B^T row j [cols]
    # ---------------------------------------------------------------------------------------------
    @gluon.jit
    def _expand_item(items_ptr, meta_ptr, sm0, sm1, smm, i, W0, W1, W2, C: gl.constexpr, RS: gl.constexpr):
        """(token, module, chunk, slot, B^T row start, rows, stages, module width) of item i."""
        e = gl.load(items_ptr + 2 * i)
        slot = gl.load(items_ptr + 2 * i + 1)
        t = e >> 12
        mod = (e >> 10) & 3
        c = e & 1023
        mrow = meta_ptr + gl.maximum(slot, 0).to(gl.int64) * sm0 + mod * smm
        b0 = gl.load(mrow + sm1)
        rank = gl.where(slot >= 0, gl.load(mrow + 3 * sm1), 0)
        width = gl.where(mod == 0, W0, gl.where(mod == 1, W1, W2))
        stages = gl.where(c * C < width, (rank + RS - 1) // RS, 0)
        return t, mod, c, slot, b0, rank, stages, width

    @gluon.jit
    def _expand_producer(b_desc, rows_ptr, meta_ptr, sm0, sm1, smm, items_ptr, n_ptr, W0, W1, W2, b_smem, full,
                         empty, RS: gl.constexpr, CB: gl.constexpr, STAGES: gl.constexpr):
        C: gl.constexpr = CB * 256
        pid = gl.program_id(0)
        G = gl.num_programs(0)
        n = gl.load(n_ptr)
        turns = (n + G - 1) // G      # snake order: every CTA takes every turn, past n it skips
        it = 0
        for k in range(0, turns):
            i = _item(items_ptr, k, pid, G)
            if i < n:
                t, mod, c, slot, b0, rank, stages, width = _expand_item(items_ptr, meta_ptr, sm0, sm1, smm, i, W0, W1,
                                                                        W2, C, RS)
                for st in range(0, stages):
                    s = it % STAGES
                    bar = full.index(s)
                    mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                    for r in gl.static_range(RS):
                        j = st * RS + r
                        ok = j < rank
                        box = (gl.load(rows_ptr + b0 + j, mask=ok, other=0) // 256).to(gl.int32)
                        mbarrier.expect(bar, b_desc.block_type.nbytes, pred=ok)
                        mbarrier.arrive(bar, pred=j >= rank)
                        tma.async_copy_global_to_shared(b_desc, [box + c * CB, 0], bar,
                                                        b_smem.index(s * RS + r), pred=ok)
                    it += 1

    @gluon.jit
    def _expand_consumer(b_smem, y_ptr, sy0, sy1, v_ptr, sv0, sv1, svm, rs_ptr, meta_ptr, sm0, sm1, smm, scale_ptr,
                         items_ptr, n_ptr, W0, W1, W2, full, empty, RS: gl.constexpr, CB: gl.constexpr,
                         STAGES: gl.constexpr, num_warps: gl.constexpr):
        C: gl.constexpr = CB * 256
        # each thread: all RS rows x 8 bytes (C = 8 x 32 x num_warps), reduced over rows in-thread
        L: gl.constexpr = gl.BlockedLayout([RS, C // (32 * num_warps)], [1, 32], [1, num_warps], [1, 0])
        plain2: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
        b_all = b_smem._reinterpret(gl.int8, [STAGES, RS, C], plain2)
        offs_r = gl.arange(0, RS, layout=gl.SliceLayout(1, L))
        offs_c = gl.arange(0, C, layout=gl.SliceLayout(0, L))
        pid = gl.program_id(0)
        G = gl.num_programs(0)
        n = gl.load(n_ptr)
        turns = (n + G - 1) // G      # snake order: every CTA takes every turn, past n it skips
        it = 0
        for k in range(0, turns):
            i = _item(items_ptr, k, pid, G)
            if i < n:
                t, mod, c, slot, b0, rank, stages, width = _expand_item(items_ptr, meta_ptr, sm0, sm1, smm, i, W0, W1,
                                                                        W2, C, RS)
                if stages > 0:
                    col0 = gl.where(mod == 0, 0, gl.where(mod == 1, W0, W0 + W1))
                    cols = c * C + offs_c
                    cmask = cols < width
                    y_ptrs = y_ptr + t.to(gl.int64) * sy0 + (col0 + cols) * sy1
                    y = gl.load(y_ptrs, mask=cmask, other=0.0)
                    s_ad = gl.load(scale_ptr + slot)
                    v_row = v_ptr + t.to(gl.int64) * sv0 + mod * svm
                    acc = gl.zeros([C], gl.float32, gl.SliceLayout(0, L))
                    for st in range(0, stages):
                        jj = st * RS + offs_r
                        jmask = jj < rank
                        w = gl.load(v_row + jj * sv1, mask=jmask, other=0.0).to(gl.float32)
                        w = w * gl.load(rs_ptr + b0 + jj, mask=jmask, other=0.0)
                        s = it % STAGES
                        mbarrier.wait(full.index(s), (it // STAGES) & 1)
                        b = b_all.index(s).load(L)
                        gl.thread_barrier()     # every warp has read the stage (see the shrink)
                        fence_async_shared()
                        mbarrier.arrive(empty.index(s))
                        acc += gl.sum(_i8_to_f32(b) * gl.expand_dims(w, 1), axis=0)
                        it += 1
                    gl.store(y_ptrs, (y.to(gl.float32) + acc * s_ad).to(y_ptr.dtype.element_ty), mask=cmask)

    @gluon.jit
    def _expand_kernel(b_desc, y_ptr, sy0, sy1, v_ptr, sv0, sv1, svm, rows_ptr, rs_ptr, meta_ptr, sm0, sm1, smm,
                       scale_ptr, items_ptr, n_ptr, W0, W1, W2, RS: gl.constexpr, CB: gl.constexpr,
                       STAGES: gl.constexpr, PREGS: gl.constexpr, num_warps: gl.constexpr):
        b_smem = gl.allocate_shared_memory(gl.int8, [STAGES * RS, CB, 256], b_desc.layout)
        full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(full.index(s), count=RS)
            mbarrier.init(empty.index(s), count=1)
        gl.warp_specialize([
            (_expand_consumer, (b_smem, y_ptr, sy0, sy1, v_ptr, sv0, sv1, svm, rs_ptr, meta_ptr, sm0, sm1, smm,
                                scale_ptr, items_ptr, n_ptr, W0, W1, W2, full, empty, RS, CB, STAGES, num_warps)),
            (_expand_producer, (b_desc, rows_ptr, meta_ptr, sm0, sm1, smm, items_ptr, n_ptr, W0, W1, W2, b_smem, full,
                                empty, RS, CB, STAGES)),
        ], [1], [PREGS])


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------
_DESCS: dict = {}


def _smem_layout(bits: int):
    return gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=bits, rank=2)


def _rows_desc(flat: torch.Tensor, kbox: int):
    """TMA descriptor of the pool's bytes as [bytes / 256, 256], boxes of kbox x 256 (cached: the
    pool never moves)."""
    key = (flat.data_ptr(), flat.numel(), kbox)
    d = _DESCS.get(key)
    if d is None:
        view = flat.view(-1, BOX)
        d = _DESCS[key] = TensorDescriptor(view, list(view.shape), list(view.stride()), [kbox, BOX], _smem_layout(8))
    return d


def supported(x_or_y: torch.Tensor, flat: torch.Tensor, dims: tuple[int, ...]) -> bool:
    """Whether the Gluon kernels can run this launch: a Hopper-or-later GPU, Gluon, int8 rows in a
    pool whose size is whole 256-byte boxes, and every row width a multiple of 256."""
    base = flat._base
    pages_ok = (base is not None and base.dim() == 2 and base.shape[1] * base.element_size() % BOX == 0
                and flat.storage_offset() == 0)     # whole boxes a page: rows of whole boxes start on one
    return (HAVE_GLUON and x_or_y.is_cuda and flat.dtype == torch.int8 and pages_ok and flat.numel() % BOX == 0
            and flat.data_ptr() % 16 == 0 and torch.cuda.get_device_capability(x_or_y.device)[0] >= 9
            and all(d % BOX == 0 and d > 0 for d in dims))


def _grid(device, cfg: dict, cap: int) -> tuple[int]:
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return (max(1, min(cap, sms * cfg["CTAS_PER_SM"])),)


def shrink(x: torch.Tensor, flat: torch.Tensor, rows: torch.Tensor, meta3: torch.Tensor, batch: LoraBatch,
           row_scale: torch.Tensor, v3: torch.Tensor, max_rank: int) -> None:
    """v3[t, m, :max_rank] = x[t] @ A^T (int8 rows, scaled), zeros past each rank; as lora_shrink."""
    from kernels.triton_lora import TUNE
    cfg = TUNE["shrink_gluon"]
    T, d_in = x.shape
    if x.stride(1) != 1 or x.stride(0) != d_in:
        x = x.contiguous()
    BR = cfg["BR"]
    items, n = _decode_plan(batch, meta3, BR, max_rank)
    kbox = _kbox(d_in)
    nbox = d_in // (kbox * BOX)
    xv = x.view(T * d_in // BOX, BOX)
    x_desc = TensorDescriptor(xv, list(xv.shape), list(xv.stride()), [kbox, BOX], _smem_layout(8 * x.element_size()))
    sm0, smm, sm1 = meta3.stride()
    sv0, svm, sv1 = v3.stride()
    _shrink_kernel[_grid(x.device, cfg, items.shape[0])](
        _rows_desc(flat, kbox), x_desc, rows, row_scale, meta3, sm0, sm1, smm, items, n, v3, sv0, sv1, svm, max_rank,
        BR=BR, KBOX=kbox, NBOX=nbox, STAGES=cfg["STAGES"], R_P2=_p2(max_rank), PREGS=cfg.get("PREGS", 48),
        num_warps=cfg["num_warps"],
        maxnreg=cfg.get("maxnreg", 128))


def expand(y: torch.Tensor, v3: torch.Tensor, flat: torch.Tensor, rows: torch.Tensor, meta3: torch.Tensor,
           scaling: torch.Tensor, batch: LoraBatch, widths: tuple[int, ...], row_scale: torch.Tensor) -> None:
    """y += scaling * v3 @ B^T per module (int8 rows); as lora_expand."""
    from kernels.triton_lora import TUNE
    cfg = TUNE["expand_gluon"]
    RS, CB = cfg["RS"], cfg["CB"]
    items, n = expand_plan(batch, meta3, widths, CB * BOX, RS, batch.max_rank)
    W0, W1, W2 = (tuple(widths) + (0, 0))[:3]
    sm0, smm, sm1 = meta3.stride()
    sv0, svm, sv1 = v3.stride()
    _expand_kernel[_grid(y.device, cfg, items.shape[0])](
        _rows_desc(flat, CB), y, y.stride(0), y.stride(1), v3, sv0, sv1, svm, rows, row_scale, meta3, sm0, sm1, smm,
        scaling, items, n, W0, W1, W2, RS=RS, CB=CB, STAGES=cfg["STAGES"], PREGS=cfg.get("PREGS", 48),
        num_warps=cfg["num_warps"],
        maxnreg=cfg.get("maxnreg", 128))
