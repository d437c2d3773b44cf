"""Multi-adapter LoRA shrink/expand in Triton, reading A and B^T rows in place from the pool.

Same functions as ``kernels.reference.lora_shrink`` / ``lora_expand``:

* shrink: ``v[t, :r] = x[t] @ A_slot(t)^T`` (zeros past the slot's rank and for base tokens);
* expand: ``y[t] += scaling[slot] * v[t, :r] @ B^T_slot(t)`` in place (y may be a column slice).

Row j of a matrix whose rows start at row-table entry ``start`` lives at
``flat[rows[start + j] : rows[start + j] + width]``; ``meta`` is ``table.meta[:, layer, module]``
(int32 [slots, 3] = A row start, B^T row start, rank), any strides.

Three schedules, picked by ``batch.max_seg_len`` and ``batch.grouped``:

* decode (max_seg_len == 1), BGMV-like: one program per (token, tile of rank rows) for shrink and
  per (token, tile of output columns) for expand; a reduction on the CUDA cores, since one token
  gives no matrix for the tensor cores. Memory bound on the adapter rows. With COMPACT the shrink
  launches one program per tile a token actually has, from a plan built on the device once per
  step (_decode_plan), instead of max-rank tiles for every token.
* grouped decode (max_seg_len == 1, tokens sorted by slot): one program per (tile of tokens, tile
  of outputs), one masked ``tl.dot`` per distinct slot in the tile; an adapter shared by many
  tokens is read once per tile, not once per token.
* prefill, SGMV-like: one program per (segment, tile of tokens, tile of outputs), ``tl.dot`` on
  tensor cores with fp32 accumulation.

Heterogeneous ranks share a launch (rows past a slot's rank are masked, and tiles wholly past
it exit early); base tokens (slot -1) exit at once (shrink still writes their zero row).

int8 rows (QUANT, ``flat`` is int8 and ``row_scale[start + j]`` scales row j): the CUDA-core
schedules scale the fp32 vector side (shrink's output column, expand's v[j]); the tensor-core
schedules dequantize the weight tile to the activation dtype before ``tl.dot`` (scaling v instead
would push its fp16 values toward underflow), except the segment shrink, whose one adapter per
program lets it scale the fp32 accumulator's columns once at the end.

int4 rows (QUANT 2, ``flat`` is uint8: two weights a byte, column 2i in the low nibble, see
server/pool.py) are the same with half the bytes. The tensor-core schedules unpack a byte tile into
int8 weights in column order (_load_i4) and run their int8 code; the decode shrink and the
row-chunk expand (the only decode expand int4 rows take) keep the byte tile as loaded and pair its
low and high nibbles with the even and odd columns instead (_i4_nibbles).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_tune import apply_overrides  # noqa: I001
from kernels.batch import LoraBatch


# Tile choices (the benchmark's --sweep overrides these to compare variants on the device).
TUNE = {
    # Picked on an H100 (2026-11-25, benchmarks/bench_kernels.py --sweep: CUDA-graph timing over
    # rotated inputs, geometric mean over 256x256 / 64x64 decode and 512..4096-token prefill cases);
    # the GPU tests ran with exactly these. LORASERVE_KERNEL_TUNE overrides them per device.
    "shrink_decode": dict(BLOCK_R=8, BLOCK_K=1024, num_warps=4, num_stages=3, PIPE=3),
    "expand_decode": dict(BLOCK_R=16, BLOCK_N=256, num_warps=2, num_stages=3),
    # int8 rows: small one-warp tiles. Picked on the H100 in the engine bench (2026-11-25, 256
    # requests over 256 adapters, CUDA-graph decode, benchmarks/results/engine-2026-11-25h-h100):
    # the step's LoRA cost fell from +29% (the fp16 tiles above) to +23%; tiles holding the fp16
    # tiles' bytes (twice the elements) cost +42%. (Registers and occupancy turned out not to be
    # what limits them; bytes per program and whole L2 lines are: see expand_decode_int8.)
    # At batch 1 the one-warp tiles cost more (a step 6.47 ms vs 6.00 with the fp16 tiles, base
    # 5.3): below INT8_SMALL_TILES_MIN_T tokens int8 rows take the fp16 tiles (threshold not swept).
    # Re-swept on an H200 (2026-12-03, benchmarks/bench_lora_decode.py: the engine's 32 layers of
    # q/k/v + o decode LoRA at 256 x 256 alone, 21 variants side by side, then the engine step;
    # benchmarks/results/lora-decode-2026-12-03-h200): 8 rows x 512 bytes, 2 warps, PIPE 4 (was
    # 8 x 256, 1 warp, PIPE 3) and the expand's rank classes cut the step's LoRA kernels from
    # 3.75 to 3.48 ms (engine profile).
    # PDL (2026-12-03, H200, benchmarks/results/lora-decode-pdl-2026-12-03-h200): each int8 decode
    # launch overlaps the tail of the kernel before it: 0.965x the LoRA time alone (0.991x with a
    # kernel between groups); in the engine's 256 x 256 step within the noise (LoRA device time
    # 3.20 vs 3.38 ms a step, overlapped +21.3/21.6% vs +21.5/21.6%, alternated).
    # COMPACT (2026-12-03, H200, benchmarks/results/lora-persist-2026-12-03-h200, calls B-E): one
    # program per work item of the step's plan instead of a (token, max-rank tile) grid whose
    # programs past a token's rank (53% of them at ranks 8..64) each spent two dependent loads to
    # find they had nothing to do: o shrink 0.444 vs 0.519 ms, q/k/v 0.995 vs 1.052 ms a step alone
    # (LoRA 0.987x, the plan included). Engine steps, alternated: 256 x 256 +20.4/+20.8% vs
    # +20.8/+20.7% (call D) and +22.2/+22.1% vs +22.4/+22.5% (B); GQA +29.3/+30.7% vs +31.1/+31.4%;
    # 64 x 64 +18.2/+18.4% vs +18.4/+18.8%.
    # PTX_DQ 2 (2026-12-04, H200, benchmarks/results/lora-ptxdq-2026-12-04-h200): the rows dequantized in PTX and,
    # with fp16 activations, multiplied and summed per thread in fp16x2: the loop's instructions per weight fell
    # from 5.9 to 2.7 (sm_90 SASS) and its registers from 120 to 80; q/k/v shrink 0.93 vs 1.00 ms a step, o
    # 0.42 vs 0.44, the LoRA alone 0.96x (two calls); engine 256 x 256 +18.0/+16.5/+19.2/+21.2% against
    # +20.2/+19.9/+20.6/+20.2% (calls 4-5, alternated).
    # With it PIPE 3 (was 4): 0.99x alone; engine +19.4/+19.7/+19.2% vs +19.3/+20.3/+19.9% with PIPE 4 and
    # +20.2/+21.1/+20.7% with PTX_DQ 0 (call 6, three rounds alternated).
    "shrink_decode_int8": dict(BLOCK_R=8, BLOCK_K=512, num_warps=2, num_stages=3, PIPE=3, PDL=True, COMPACT=True,
                               PTX_DQ=2),
    # Re-swept with the engine's kernel profile (2026-11-25, benchmarks/results/
    # tune-sweep-2026-11-25j-h100/expand-int8): 8 rows of 128 bytes, one L2 line each, with one
    # token's column tiles launched together (TILE_FIRST): 34.1 us a launch vs 38.7 for 16 x 64.
    # RCLASS (2026-12-03, H200): ranks up to 16 load all their rows at once (a 4-, 8- or 16-row
    # tile), larger ones walk 16 rows at a time: 0.97x the LoRA time of 8-row steps.
    # BIAS (2026-12-04, H200, benchmarks/results/lora-bias-2026-12-04-h200): rows as fp32 32896 + q by one prmt a
    # weight, each thread's sums kept to the program's end, 4 row tiles to a PTX block, and BLOCK_R 32 (was 16):
    # the LoRA alone 0.982-0.986x (q/k/v expand 1.211 vs 1.250 ms, o 0.463 vs 0.498, call 5); engine 256 x 256,
    # eight pairs alternated over calls 2, 3 and 5: +17.8% against +18.8% (mean), ahead in 7 of 8.
    # ROWS (2026-12-04, H200, benchmarks/results/lora-rows-2026-12-04-h200): by row chunks instead (the tiles
    # above remain for ROWS False), tiles below: q/k/v expand 1.036 vs 1.214 ms a step alone, the LoRA 0.914x and
    # 0.915x (calls 1-3); engine 256 x 256, eleven pairs alternated over three calls: +17.2% against +18.1% (mean),
    # ahead in 9 of 11.
    "expand_decode_int8": dict(BLOCK_R=32, BLOCK_N=128, num_warps=1, num_stages=3, TILE_FIRST=True, RCLASS=True,
                               PDL=True, BIAS=True, PTX_DQ=1, ROWS=True),
    # ROWS (the expand's families; default False, on in expand_decode_int8): int8 rows by row chunks, with these
    # tiles (see _expand_rows_kernel): BLOCK_R rows a chunk, BLOCK_N columns a step (512 a warp keeps rows
    # in-thread), SPLIT programs a chunk by columns, G4 (default False) the rows summed 4 to an FMA chain (see
    # _expand_rows).
    # Swept on the H200 (lora-rows-2026-12-04-h200, the LoRA alone, calls 1-2): BLOCK_R 8 1.03x and 32 1.14x the
    # time of 16; G4 0.98x; 1024 columns on 2 warps 0.96-0.97x 512 on 1 (2048 on 4 no better); PIPE 2 0.98x 3, 4
    # between; SPLIT 2 sped the one-module o expand (0.97x) and slowed q/k/v (1.08x); o's own tiles (BLOCK_R 8, SPLIT
    # 2, both, 512 columns on 1 warp) bought nothing (0.998-1.003x, call 3; d822b71 has the key).
    "expand_decode_rows": dict(BLOCK_R=16, BLOCK_N=1024, num_warps=2, num_stages=3, PIPE=2, SPLIT=1, PDL=True,
                               PTX_DQ=1, G4=True),
    # int4 rows (2026-12-05, H100): the shrink on int8's tiles; the expand on 2048 columns, so that a warp's row
    # tile holds 1024 bytes as int8's does (1024 columns on 2 warps split the rows across warps: 3x slower;
    # 4096 on 4 warps: 0.99x at Llama-7B, 1.03x at GQA shapes), in chunks of 8 rows (0.98x / 0.97x of 16's,
    # call 8; PIPE 3 1.03x, PIPE 1 1.09x); benchmarks/results/lora-int4-2026-12-05
    "shrink_decode_int4": dict(BLOCK_R=8, BLOCK_K=512, num_warps=2, num_stages=3, PIPE=3, PDL=True, COMPACT=True,
                               PTX_DQ=2),
    "expand_decode_rows_int4": dict(BLOCK_R=8, BLOCK_N=2048, num_warps=2, num_stages=3, PIPE=2, SPLIT=1, PDL=True,
                                    PTX_DQ=1, G4=True),
    # FUSED (lora_apply): a group's decode shrink and expand in one launch by rank-row chunks
    # (_fused_decode_kernel), from MIN_T tokens; the shrink's loop on BLOCK_K columns with PIPE stages and PTX_DQ,
    # the expand's on BLOCK_N columns with PIPE_E and PTX_DQ 1, both on the same BLOCK_R rows (the split
    # kernels' tiles above); MULTI: what launches of several modules (q/k/v) take instead.
    # Picked on the H100 (2026-12-05, benchmarks/results/lora-fused-2026-12-05, calls A-D): 256 x 256 decode LoRA
    # alone 0.89-0.92x the split kernels' time (int4 and int8); PIPE_E 3 0.99x 2; q/k/v's shrink on 1024
    # columns 0.975x (int4) and 0.994x (int8), o's slower on them (its items then take two waves of programs:
    # 166 registers; at PIPE 2, 8 programs an SM, still 1.05x); BLOCK_R 16, BLOCK_K 256, o on 4-row chunks, an
    # expand of 4096 columns on 4 warps, int8's on 2048 columns or 512 on one warp, and the B^T rows prefetched
    # into the L2 during the A loop (a24aea5 has it) all lost 1-25%.
    "fused_decode_int8": dict(FUSED=True, MIN_T=1, BLOCK_R=8, BLOCK_K=512, BLOCK_N=1024, num_warps=2, num_stages=3,
                              PIPE=3, PIPE_E=3, PDL=True, PTX_DQ=2, G4=True, MULTI=dict(BLOCK_K=1024)),
    "fused_decode_int4": dict(FUSED=True, MIN_T=1, BLOCK_R=8, BLOCK_K=512, BLOCK_N=2048, num_warps=2, num_stages=3,
                              PIPE=3, PIPE_E=3, PDL=True, PTX_DQ=2, G4=True, MULTI=dict(BLOCK_K=1024)),
    # Three more keys of the fused families, off until measured (benchmarks/results/lora-prefetch-2026-12-05 has the
    # device call that compares them, prepared but not yet run). SUB: the shrink's step as SUB tiles of BLOCK_K /
    # SUB columns summed into one accumulator that wide (see _shrink_rows): in the offline sm_90 build (Triton 3.6,
    # benchmarks/kernel_registers.py --fused) q/k/v on 1024 columns with SUB 2 holds 126 registers instead of 168
    # (int4; int8 110 instead of 161), so 8 programs fit an SM instead of 6 (int8 9), and o on 1024 columns holds 126
    # instead of 166, so its ~960 programs stay one wave. PREFETCH (bit 1: the chunk's A rows, bit 2: its B^T rows)
    # asks the L2 for whole rows by bulk prefetches before the PDL wait, a deeper pipeline that costs no shared
    # memory (the programs are latency-bound: Nsight Compute, call E). G8 sums a chunk's 8 rows as 8 one-row tiles
    # in one FMA chain (two 4-row PTX blocks; int4 o: 96 registers instead of 118).
    # Each decode family also takes PIPE (default 1): software-pipeline the loop's loads PIPE - 1
    # tiles ahead; and TILE_FIRST (default False): order the grid so one token's tiles launch
    # together; the expand also RCLASS (default False, see _expand_decode_kernel). (Reducing each tile as it loads, which halves the registers, was measured and gave
    # nothing: benchmarks/results/tune-sweep-2026-11-25j-h100.) PDL (default False): launch as a
    # programmatic dependent launch on sm_90+ GPUs (see _pdl_wait; ignored elsewhere).
    # COMPACT (shrink only, default False): launch one program per work item of a per-step plan
    # (see _shrink_decode_kernel). SPLIT_K=None: split d_in when the grid leaves most SMs idle (see lora_shrink); 1: never.
    # PTX_DQ (default 0): how int8 rows are dequantized (see _ptx_dq).
    # BIAS (expand, int8 rows, with RCLASS; default False): see _biased_fma and _expand_chunk_biased.
    # Segment tiles re-swept on the H100 with short prompts among the cases (2026-11-25, 8..4096
    # tokens over 1..64 segments; benchmarks/results/kernels-prefill-2026-11-25-h100.md).
    # BLOCK_N: the rank tile (None: the padded max rank up to 128, so x is read once). Smaller tiles
    # spread a rank-128 segment over more programs (short prompts of mixed ranks end on those): 64
    # (2026-12-04, H200, benchmarks/results/lora-bias-2026-12-04-h200 call 1, graph us, two runs each):
    # 1024 tokens in 4 mixed segments 30.2/30.1 vs 33.3/33.3, 512 / 8 26.6/26.5 vs 26.3/26.3, 4096 / 64
    # 72.8/72.7 vs 73.0/72.9; ranks up to 64 unchanged. 32 was 1.1x slower at 512 and 4096 tokens.
    # I4_SPLIT (both segment families, int4 rows; default False, not yet measured): dots by nibble plane (see
    # _shrink_seg_kernel) instead of interleaving each weight tile's nibbles.
    "shrink_seg": dict(BLOCK_M=None, BLOCK_K=128, num_warps=8, num_stages=4, SPLIT_K=None, BLOCK_N=64),
    # expand_seg: 8 warps (was 4) gained in every case of the same sweep (1024 / 4 mixed 14.0 vs 14.7 us, 4096
    # tokens 35.9 vs 37.5, 4096 / 64 mixed 39.9 vs 43.6).
    "expand_seg": dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2),
    # grouped decode: swept on the H100 the same way (2026-11-25, 256 tokens over 16/64 adapters,
    # 64 over 4; benchmarks/results/kernels-grouped-2026-11-25-h100.md)
    "shrink_grouped": dict(BLOCK_M=16, BLOCK_R=16, BLOCK_K=512, num_warps=4, num_stages=3, SPLIT_K=None,
                           programs_per_sm=4),
    "expand_grouped": dict(BLOCK_M=16, BLOCK_N=128, num_warps=2, num_stages=3),
}
apply_overrides("lora", TUNE)
INT8_SMALL_TILES_MIN_T = 64


def _row_align(flat: torch.Tensor) -> int:
    """Element alignment every row offset is known to have (pool rows are 8-aligned in a page,
    int8 rows 16-aligned: see server/pool.py).

    ``flat`` is ``pool.adapter_flat``, a view of ``pool.data`` that holds the page size. With a
    page size that is a multiple of the alignment every row starts aligned, which lets the
    compiler emit 16-byte loads.
    """
    base = flat._base
    align = 16 if flat.element_size() == 1 else 8     # int8 and int4 (uint8) rows: 16 bytes
    if (base is not None and base.dim() == 2 and base.shape[1] * base.element_size() % (align * flat.element_size()) == 0
            and flat.storage_offset() == 0 and flat.data_ptr() % 16 == 0):
        return align
    return 1


@triton.jit
def _load_rows(ptrs, mask, QUANT: tl.constexpr):
    """A tile of adapter rows. Model-dtype rows are loaded masked (fp16 garbage can be NaN, and
    NaN * 0 is NaN). int8 rows are loaded unmasked: masks whose bounds the compiler cannot prove
    aligned (a module's width, a rank) cut int8 loads to single bytes, and at 1 byte the
    pipeliner's async copies fail to compile. Unmasked is safe: every address is a row start plus
    less than one tile, inside the pool (whose last page is scratch); rows past a rank read from
    offset 0 and get scale 0; columns past d_in meet activations masked to 0; columns past d_out are
    never stored. int8 garbage is finite, so each of those products is exactly 0 or never seen."""
    if QUANT:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _load_i4(row_ptrs, c0, N: tl.constexpr):
    """[rows, N] int8 weights of int4 rows (``row_ptrs``: each row's first byte) at columns
    c0 .. c0 + N (c0 even), from N / 2 bytes a row (the low nibble is the even column). Unmasked,
    as int8 rows are (see _load_rows): the bytes past a row's end lie in the pool and meet zero
    activations or are never stored."""
    lo, hi = _i4_nibbles(tl.load(row_ptrs[:, None] + (c0 // 2 + tl.arange(0, N // 2))[None, :]))
    return tl.reshape(tl.join(lo, hi), [row_ptrs.shape[0], N])


@triton.jit
def _i4_nibbles(b):
    """(low, high) nibbles of int4 bytes as int8: both are two's complement, so an arithmetic
    shift sign-extends each."""
    q = b.to(tl.int8, bitcast=True)
    return (q << 4) >> 4, q >> 4


@triton.jit
def _i8_to_f16(q):
    """int8 -> fp16, exact, in integer ops: 0x6480 + q is the bit pattern of the fp16 number
    1152 + q (exponent of 1024, q + 128 in the mantissa). The int-to-float conversion instruction
    runs at an eighth of the FP32 rate on the H100: on every weight it bound the decode kernels."""
    h = (q.to(tl.int16) + tl.full(q.shape, 0x6480, tl.int16)).to(tl.float16, bitcast=True)
    return h - tl.full(q.shape, 1152.0, tl.float16)


# the inline PTX of the dequantizing helpers below, as module constants (a kernel reads only constexpr
# globals) so that tests can run them through an emulator (tests/test_kernels.py: _run_ptx)
_I8_TO_F16_ASM = tl.constexpr("""{
        .reg .b32 t, k, m;
        xor.b32 t, $2, 0x80808080;
        mov.b32 k, 0x64646464;
        mov.b32 m, 0x64806480;
        prmt.b32 $0, t, k, 0x5140;
        prmt.b32 $1, t, k, 0x7362;
        sub.f16x2 $0, $0, m;
        sub.f16x2 $1, $1, m;
        }""")
_I8_FMA_F16_ASM = tl.constexpr("""{
        .reg .b32 t, a, b, k, s, m;
        xor.b32 t, $2, 0x80808080;
        mov.b32 k, 0x64646464;
        mov.b32 s, 0x20002000;
        mov.b32 m, 0xC880C880;
        prmt.b32 a, t, k, 0x5140;
        prmt.b32 b, t, k, 0x7362;
        fma.rn.f16x2 a, a, s, m;
        fma.rn.f16x2 b, b, s, m;
        fma.rn.f16x2 $0, a, $3, $5;
        fma.rn.f16x2 $1, b, $4, $6;
        }""")
_I4_FMA_F16_ASM = tl.constexpr("""{
        .reg .b32 t, z, a, b, l0, l1, h0, h1, m, s, k;
        xor.b32 t, $4, 0x88888888;
        mov.b32 z, 0;
        mov.b32 m, 0x30003000;
        mov.b32 k, 0xD808D808;
        mov.b32 s, 0x20002000;
        prmt.b32 a, t, z, 0x4140;
        prmt.b32 b, t, z, 0x4342;
        lop3.b32 l0, a, 0x000F000F, 0x64006400, 0xEA;
        lop3.b32 l1, b, 0x000F000F, 0x64006400, 0xEA;
        lop3.b32 h0, a, 0x00F000F0, 0x64006400, 0xEA;
        lop3.b32 h1, b, 0x00F000F0, 0x64006400, 0xEA;
        fma.rn.f16x2 l0, l0, m, k;
        fma.rn.f16x2 l1, l1, m, k;
        mov.b32 k, 0xC880C880;
        fma.rn.f16x2 h0, h0, s, k;
        fma.rn.f16x2 h1, h1, s, k;
        fma.rn.f16x2 $0, l0, $5, $9;
        fma.rn.f16x2 $1, l1, $6, $10;
        fma.rn.f16x2 $2, h0, $7, $11;
        fma.rn.f16x2 $3, h1, $8, $12;
        }""")


@triton.jit
def _i8_to_f16_ptx(q):
    """_i8_to_f16 in 6 PTX instructions per 4 weights, where Triton's integer ops take ~11 (byte
    sign extensions, 16-bit adds and repacking: PRMT was the most issued instruction of the int8
    decode kernels, whose issue slots were 61% busy at 64% of the DRAM bandwidth, Nsight Compute
    on the H200). xor 0x80 biases each byte to u = q + 128; prmt puts two bytes under 0x64, the
    fp16 numbers 1024 + u; subtracting 1152 leaves q exactly."""
    return tl.inline_asm_elementwise(
        asm=_I8_TO_F16_ASM,
        constraints="=r,=r,r", args=[q], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _i8_fma_f16(q, x, acc):
    """acc + (q / 128) * x in fp16x2 for int8 q and fp16 x, acc (PTX_DQ 2, the fp16 decode shrink):
    7 instructions per 4 weights where dequantizing to fp32 and an fp32 FMA take 13. The fma
    (1024 + u) / 128 - 9 gives q / 128 exactly, so an accumulator of one thread, which sums one
    product per BLOCK_K step (8 at d_in 4096), stays far from fp16's range; the caller multiplies
    the fp32 sum by 128."""
    return tl.inline_asm_elementwise(
        asm=_I8_FMA_F16_ASM,
        constraints="=r,=r,r,r,r,r,r", args=[q, x, acc], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _i4_fma_f16(b, xe, xo, acc_e, acc_o):
    """(acc_e + lo / 8 * xe, acc_o + hi / 8 * xo) in fp16x2 for int4 bytes b (lo: the low nibbles,
    the even columns; PTX_DQ 2, the int4 decode shrink): 15 instructions per 8 weights. xor 0x88
    turns each two's complement nibble into n = q + 8; lop3 puts a nibble under 0x64 as the fp16
    1024 + n (low) or 1024 + 16n (high); one fma leaves q / 8 exactly (so a thread's fp16 sums stay
    as far from fp16's range as _i8_fma_f16's); the caller multiplies the fp32 sum by 8."""
    return tl.inline_asm_elementwise(
        asm=_I4_FMA_F16_ASM,
        constraints="=r,=r,=r,=r,r,r,r,r,r,r,r,r,r", args=[b, xe, xo, acc_e, acc_o], dtype=(tl.float16, tl.float16),
        is_pure=True, pack=4)


@triton.jit
def _rows_f32(w, QUANT: tl.constexpr, DQ: tl.constexpr = 0):
    """A loaded tile of rows in fp32 (int8 rows still unscaled). DQ: dequantize in PTX (CUDA
    only: the interpreter runs no inline assembly; TUNE key PTX_DQ)."""
    if QUANT:
        if DQ:
            return _i8_to_f16_ptx(w).to(tl.float32)
        return _i8_to_f16(w).to(tl.float32)
    return w.to(tl.float32)


@triton.jit
def _dequant(q, scale, dtype: tl.constexpr):
    """An int8 tile times its rows' scales (``scale`` already broadcast along the rows' axis), in
    ``dtype`` for tl.dot."""
    return (_i8_to_f16(q).to(tl.float32) * scale).to(dtype)


@triton.jit
def _token_and_tile(TILE_FIRST: tl.constexpr):
    """(token, tile) of a decode program: the grid is (tokens, tiles, modules), or with TILE_FIRST
    (tiles, tokens, modules), so programs launched together work on one token's tiles."""
    if TILE_FIRST:
        return tl.program_id(1), tl.program_id(0)
    return tl.program_id(0), tl.program_id(1)


_PROPS: dict = {}


def _props(device):
    """A CUDA device's properties (cached: wrappers ask on every launch)."""
    props = _PROPS.get(device.index)
    if props is None:
        props = _PROPS[device.index] = torch.cuda.get_device_properties(device)
    return props


def _sms(device) -> int:
    """Multiprocessor count; the interpreter pretends to have 4."""
    return _props(device).multi_processor_count if device.type == "cuda" else 4


def _p2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


# ---------------------------------------------------------------------------------------------
# modules of one launch
# ---------------------------------------------------------------------------------------------
# Modules that read the same input (q/k/v; gate/up) share one launch: a grid axis picks the module,
# whose meta rows, v columns and output columns are at fixed strides. Their outputs are adjacent
# column ranges of one fused GEMM output, of widths W0, W1, W2 (up to three modules).
@triton.jit
def _module(mod, y_ptr, sy1, v_ptr, svm, meta_ptr, smm, W0, W1, W2):
    """Pointers and output width of module ``mod`` of a multi-module expand."""
    col0 = 0
    d_out = W0
    if mod >= 1:
        col0 = W0
        d_out = W1
    if mod >= 2:
        col0 = W0 + W1
        d_out = W2
    return y_ptr + col0 * sy1, v_ptr + mod * svm, meta_ptr + mod * smm, d_out


# ---------------------------------------------------------------------------------------------
# decode (one token per segment): BGMV-like
# ---------------------------------------------------------------------------------------------
# PDL (programmatic dependent launch, sm_90+; TUNE key PDL): a decode kernel is launched while the
# kernel before it still runs. Each program first lets the next kernel launch and reads what no
# kernel writes (its slot, meta and row offsets), then waits for the previous kernel to complete
# before it reads activations or stores anything. Every program waits before it exits, so a kernel
# that has completed implies that the one before it has too.
@triton.jit
def _pdl_wait(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def _pdl_launch_dependents(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _shrink_decode_kernel(x_ptr, sx0, sx1, flat_ptr, rows_ptr, rs_ptr, meta_ptr, sm0, sm1, smm, slot_ptr,
                          items_ptr, n_ptr, v_ptr, sv0, sv1, svm, d_in, max_rank,
                          ALIGN: tl.constexpr, QUANT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                          PIPE: tl.constexpr, TILE_FIRST: tl.constexpr, PDL: tl.constexpr, PLAN: tl.constexpr,
                          R_P2: tl.constexpr, DQ: tl.constexpr = 0):
    if PLAN:
        # compact grid (TUNE key COMPACT): program i takes work item i of the step's plan
        # (_decode_plan); programs past the plan's count only exit
        i = tl.program_id(0)
        _pdl_launch_dependents(PDL)
        n = tl.load(n_ptr)
        e = tl.load(items_ptr + 2 * i)
        slot = tl.load(items_ptr + 2 * i + 1)
        if i >= n:
            _pdl_wait(PDL)
            return
        t, mod, n_tiles, rt = _plan_fields(e)
    else:
        t, rt = _token_and_tile(TILE_FIRST)
        _pdl_launch_dependents(PDL)
        mod = tl.program_id(2)
        slot = tl.load(slot_ptr + t)
        n_tiles = 0
    meta_ptr += mod * smm
    v_ptr += mod * svm
    offs_r = rt * BLOCK_R + tl.arange(0, BLOCK_R)
    out_mask = offs_r < max_rank
    v_ptrs = v_ptr + t.to(tl.int64) * sv0 + offs_r * sv1
    rank = 0
    a0 = 0
    if slot >= 0:
        mrow = meta_ptr + slot.to(tl.int64) * sm0
        a0 = tl.load(mrow)
        rank = tl.load(mrow + 2 * sm1)
    if rt * BLOCK_R >= rank:
        # base token, a module the adapter does not target, or a tile past its rank: zeros
        _pdl_wait(PDL)
        tl.store(v_ptrs, tl.zeros([BLOCK_R], dtype=v_ptr.dtype.element_ty), mask=out_mask)
        if PLAN:
            _zero_tail(v_ptr + t.to(tl.int64) * sv0, sv1, rt, n_tiles, max_rank, BLOCK_R, R_P2)
        return
    rmask = offs_r < rank
    roff = tl.load(rows_ptr + a0 + offs_r, mask=rmask, other=0)
    if ALIGN > 1:
        roff = tl.multiple_of(roff, ALIGN)
    x_row = x_ptr + t.to(tl.int64) * sx0
    _pdl_wait(PDL)
    out = _shrink_rows(x_row, sx1, flat_ptr, roff, rmask, d_in, QUANT, BLOCK_R, BLOCK_K, PIPE, DQ)
    if QUANT:
        out *= tl.load(rs_ptr + a0 + offs_r, mask=rmask, other=0.0)
    tl.store(v_ptrs, out.to(v_ptr.dtype.element_ty), mask=out_mask)
    if PLAN:
        _zero_tail(v_ptr + t.to(tl.int64) * sv0, sv1, rt, n_tiles, max_rank, BLOCK_R, R_P2)


@triton.jit
def _shrink_rows(x_row, sx1, flat_ptr, roff, rmask, d_in, QUANT: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_K: tl.constexpr, PIPE: tl.constexpr, DQ: tl.constexpr, SUB: tl.constexpr = 1):
    """x_row . row j for the BLOCK_R rows at pool offsets roff (rows past rmask: zeros), fp32,
    before the rows' scales: the decode shrink's loop over d_in, BLOCK_K columns a step. SUB > 1
    loads a step as SUB tiles of BLOCK_K / SUB columns summed into one accumulator that wide: a
    step's bytes with a narrower tile's registers (the accumulator is most of them)."""
    BK: tl.constexpr = BLOCK_K // SUB
    offs_k = tl.arange(0, BK)
    # int4 rows: the tile stays as loaded, a byte a column pair, and x splits into the pairs'
    # even and odd columns instead (interleaving the weights cost more than the bytes saved)
    KW: tl.constexpr = BK // 2 if QUANT == 2 else BK
    if DQ == 2:
        acc = tl.zeros([BLOCK_R, KW], dtype=tl.float16)
    else:
        acc = tl.zeros([BLOCK_R, KW], dtype=tl.float32)
    acc_o = acc     # int4 rows, PTX_DQ 2: the odd columns' sums
    # PIPE > 1: the loop's loads are software-pipelined (cp.async into shared memory, PIPE - 1
    # tiles ahead). Triton pipelines only loads that feed tl.dot unless the loop asks. On the H100
    # the int8 launch fell from 35.4 to 32.0 us with PIPE=3 (engine profile, 256 x 256).
    for k_step in tl.range(0, d_in, BLOCK_K, num_stages=PIPE):
        for h in tl.static_range(SUB):      # (one step's sub-tiles)
            k0 = k_step + h * BK
            kk = k0 + offs_k
            kmask = kk < d_in
            if QUANT == 2:
                b = tl.load(flat_ptr + roff[:, None] + (k0 // 2 + tl.arange(0, KW))[None, :])
                xe, xo = tl.split(tl.reshape(tl.load(x_row + kk * sx1, mask=kmask, other=0.0), [KW, 2]))
                if DQ == 2:     # fp16 x: even and odd columns summed apart in fp16x2, added at the end
                    acc, acc_o = _i4_fma_f16(b, tl.broadcast_to(xe[None, :], [BLOCK_R, KW]),
                                             tl.broadcast_to(xo[None, :], [BLOCK_R, KW]), acc, acc_o)
                else:
                    lo, hi = _i4_nibbles(b)
                    acc += (_rows_f32(lo, 1, DQ) * xe.to(tl.float32)[None, :]
                            + _rows_f32(hi, 1, DQ) * xo.to(tl.float32)[None, :])
            elif DQ == 2:      # fp16 x, products and per-thread sums in fp16x2 (see _i8_fma_f16)
                w = _load_rows(flat_ptr + roff[:, None] + kk[None, :], rmask[:, None] & kmask[None, :], QUANT)
                xh = tl.load(x_row + kk * sx1, mask=kmask, other=0.0)
                acc = _i8_fma_f16(w, tl.broadcast_to(xh[None, :], [BLOCK_R, BK]), acc)
            else:
                w = _load_rows(flat_ptr + roff[:, None] + kk[None, :], rmask[:, None] & kmask[None, :], QUANT)
                xv = tl.load(x_row + kk * sx1, mask=kmask, other=0.0).to(tl.float32)
                acc += _rows_f32(w, QUANT, DQ) * xv[None, :]
    out = tl.sum(acc.to(tl.float32), axis=1)
    if QUANT == 2 and DQ == 2:
        out = (out + tl.sum(acc_o.to(tl.float32), axis=1)) * 8.0
    elif DQ == 2:
        out *= 128.0
    return out


@triton.jit
def _zero_tail(v_row, sv1, rt, n_tiles, max_rank, BLOCK_R: tl.constexpr, R_P2: tl.constexpr):
    """A compact grid has no programs for tiles past the plan's rank: the program of a pair's last
    tile (or of its only item, when it has none) writes the zeros from there to max_rank."""
    jj = tl.arange(0, R_P2)
    last = jj * 0 + rt == tl.maximum(n_tiles, 1) - 1     # a vector: scalar mask terms break the interpreter
    tl.store(v_row + jj * sv1, tl.zeros([R_P2], dtype=v_row.dtype.element_ty),
             mask=last & (jj >= n_tiles * BLOCK_R) & (jj < max_rank))


# A plan item's code, one int32: token << 14 | module << 12 | the pair's tiles << 6 | this tile.
PLAN_TILES, PLAN_TOKENS = 64, 1 << 17     # what it holds: fewer tiles a pair, fewer tokens


def _plan_fits(T: int, max_rank: int, block_r: int) -> bool:
    """Whether plan codes hold a batch of T tokens at max_rank in tiles of block_r rows."""
    return T < PLAN_TOKENS and triton.cdiv(max_rank, block_r) < PLAN_TILES


@triton.jit
def _plan_code(t, m, tiles, j):
    return (t << 14) | (m << 12) | (tiles << 6) | j


@triton.jit
def _plan_fields(e):
    """(token, module, the pair's tiles, this tile) of a _plan_code."""
    return e >> 14, (e >> 12) & 3, (e >> 6) & 63, e & 63


@triton.jit
def _decode_plan_kernel(slot_ptr, meta_ptr, sm0, sm1, smm, sml, L, items_ptr, n_ptr, T, M,
                        BLOCK_R: tl.constexpr, BLOCK: tl.constexpr, NT: tl.constexpr, FIELD: tl.constexpr):
    """A compact decode grid's work items, in one program: for every (token, module) pair p =
    t * M + m, one item per tile of BLOCK_R rank rows (rank: meta field FIELD, 2 for A's rows, 3
    for B^T's, its largest over the L layers at stride sml), or one zeros-only item when it has
    none; each item is (_plan_code, slot), in token order (an exclusive prefix sum gives a pair
    its first)."""
    base = 0
    for p0 in range(0, T * M, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        pmask = p < T * M
        t = p // M
        m = p - t * M
        slot = tl.load(slot_ptr + t, mask=pmask, other=-1)
        rank = _max_over_layers(meta_ptr + slot.to(tl.int64) * sm0 + m * smm + FIELD * sm1, sml, L, pmask & (slot >= 0),
                                8)
        tiles = (rank + BLOCK_R - 1) // BLOCK_R
        cnt = tl.where(pmask, tl.maximum(tiles, 1), 0)
        first = base + tl.cumsum(cnt, axis=0) - cnt
        for j in tl.static_range(NT):
            ok = j < cnt
            tl.store(items_ptr + 2 * (first + j), _plan_code(t, m, tiles, j), mask=ok)
            tl.store(items_ptr + 2 * (first + j) + 1, slot, mask=ok)
        base += tl.sum(cnt, axis=0)
    tl.store(n_ptr, base)


def _all_layers(meta3: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(meta of every layer as [slots, layers, M, 4], the plan cache's key). ``meta3`` is one
    layer's [slots, M, 4] view of ``AdapterTable.meta`` ([slots, layers, modules, 4]); plans are
    built from ranks over all layers, so one plan serves every layer of a step (a module that
    skips a layer, PEFT's layers_to_transform, has rank 0 there and its items add zeros). Any other
    meta is taken as the only layer."""
    base = meta3._base
    if (base is not None and base.dim() == 4 and base.is_contiguous() and meta3.stride(0) == base.stride(0)
            and meta3.stride(2) == base.stride(3) and (meta3.shape[1] == 1 or meta3.stride(1) == base.stride(2))):
        layer = meta3.storage_offset() % base.stride(0) // base.stride(1)
        off = meta3.storage_offset() - layer * base.stride(1)
        view = base.as_strided((base.shape[0], base.shape[1], meta3.shape[1], 4),
                               (base.stride(0), base.stride(1), base.stride(2), base.stride(3)), off)
        return view, base.data_ptr() + off * base.element_size()
    return meta3.unsqueeze(1), meta3.data_ptr()


@triton.jit
def _max_over_layers(ptrs, sml, L, mask, LB: tl.constexpr):
    """Elementwise max of ``ptrs[i] + layer * sml`` over the L layers, LB layers a load: the plan
    runs serially before a step's first shrink, and one load per layer made it ~30 us (H200)."""
    r = tl.zeros(ptrs.shape, dtype=tl.int32)
    for l0 in range(0, L, LB):
        ll = l0 + tl.arange(0, LB)
        got = tl.load(ptrs[:, None] + ll[None, :] * sml, mask=mask[:, None] & (ll < L)[None, :], other=0)
        r = tl.maximum(r, tl.max(got, axis=1))
    return r


def _decode_plan(batch: LoraBatch, meta3: torch.Tensor, block_r: int, max_rank: int,
                 kind: str = "shrink") -> tuple[torch.Tensor, torch.Tensor]:
    """(items, count) of a compact decode grid ("shrink": tiles of A's rows; "expand": chunks of
    B^T's), built on the device by one small launch (CUDA graphs replay it with each step's
    slots) and kept on the batch: one plan serves every layer."""
    meta4, where = _all_layers(meta3)
    T, M = batch.token_slot.numel(), meta4.shape[2]
    nt = max(1, triton.cdiv(max_rank, block_r))
    key = (kind, where, M, block_r, nt)
    if key not in batch.plans:
        items = torch.empty(T * M * nt, 2, dtype=torch.int32, device=meta4.device)
        n = torch.empty(1, dtype=torch.int32, device=meta4.device)
        sm0, sml, smm, sm1 = meta4.stride()
        _decode_plan_kernel[(1,)](batch.token_slot, meta4, sm0, sm1, smm, sml, meta4.shape[1], items, n, T, M,
                                  BLOCK_R=block_r, BLOCK=min(1024, _p2(T * M)), NT=nt,
                                  FIELD=2 if kind == "shrink" else 3, num_warps=8)
        batch.plans[key] = items, n
    return batch.plans[key]


@triton.jit
def _load_rank_rows(ptrs, rmask, cmask, QUANT: tl.constexpr):
    """A [rows, cols] tile of adapter rows masked by row (rank). int8 rows are masked by row only:
    a mask constant along the row keeps the loads 16 bytes wide (a column mask cuts them to
    single bytes, see _load_rows), so no row past the rank is read; columns past the width meet
    zero activations or are never stored."""
    if QUANT:
        return tl.load(ptrs, mask=rmask[:, None], other=0)
    return tl.load(ptrs, mask=rmask[:, None] & cmask[None, :], other=0.0)


@triton.jit
def _expand_chunk(flat_ptr, rows_ptr, rs_ptr, v_row, sv1, b0, j0, rank, offs_n, nmask,
                  ALIGN: tl.constexpr, QUANT: tl.constexpr, BR: tl.constexpr, DQ: tl.constexpr):
    """sum over rows j0 .. j0 + BR (those below rank) of v[j] * B^T row j, at columns offs_n."""
    jj = j0 + tl.arange(0, BR)
    jmask = jj < rank
    roff = tl.load(rows_ptr + b0 + jj, mask=jmask, other=0)
    if ALIGN > 1:
        roff = tl.multiple_of(roff, ALIGN)
    vj = tl.load(v_row + jj * sv1, mask=jmask, other=0.0).to(tl.float32)
    if QUANT:
        vj *= tl.load(rs_ptr + b0 + jj, mask=jmask, other=0.0)
    b = _rows_f32(_load_rank_rows(flat_ptr + roff[:, None] + offs_n[None, :], jmask, nmask, QUANT), QUANT, DQ)
    return tl.sum(b * vj[:, None], axis=0)


def _biased_fma_asm(n: int) -> str:
    """PTX for _biased_fma over n rows: per row one xor (bias each byte to q + 128) and per weight
    one prmt, whose bytes (0x47, 0, q + 128, 0) are the fp32 number 2^15 + q + 128, and one fma."""
    acc_in = 4 + 5 * n
    lines = [".reg .b32 t, k, f;", ".reg .f32 a0, a1, a2, a3;", "mov.b32 k, 0x47000000;"]
    for i in range(n):
        lines.append(f"xor.b32 t, ${4 + i}, 0x80808080;")
        for c in range(4):
            lines.append(f"prmt.b32 f, t, k, 0x75{c}4;")
            src = f"${acc_in + c}" if i == 0 else f"a{c}"
            lines.append(f"fma.rn.f32 a{c}, f, ${4 + n + 4 * i + c}, {src};")
    lines += [f"mov.b32 ${c}, a{c};" for c in range(4)]
    return "{\n" + "\n".join(lines) + "\n}"


def _biased_fma_constraints(n: int) -> str:
    return ",".join(["=r"] * 4 + ["r"] * (5 * n + 4))


# (globals a kernel reads must be constexprs)
_BIASED_FMA_1, _BIASED_FMA_2, _BIASED_FMA_4 = (tl.constexpr(_biased_fma_asm(n)) for n in (1, 2, 4))
_BIASED_FMA_C1, _BIASED_FMA_C2, _BIASED_FMA_C4 = (tl.constexpr(_biased_fma_constraints(n)) for n in (1, 2, 4))


@triton.jit
def _biased_f32(q):
    """int8 q as the fp32 number 32896 + q, exactly (what _biased_fma's prmt builds)."""
    return (q.to(tl.int32) + 32896).to(tl.float32)


@triton.jit
def _biased_fma(acc, q0, v0, q1, v1, q2, v2, q3, v3, N: tl.constexpr, DQ: tl.constexpr):
    """acc + sum over the first N rows i of (32896 + q_i) * v_i (BIAS, the int8 decode expand). The
    caller subtracts 32896 * sum(v) once per program: that replaces dequantizing each weight to
    fp16 and converting it to fp32 (2.25 instructions a weight) with one prmt. The fp32 sums keep
    ~9 bits below q's resolution (24 less the 2^15 offset's), far below int8's own rounding. PTX
    where DQ (the interpreter runs none). The N rows are one block: ptxas still issues a row's
    load after the rows before it are summed (sm_90 SASS), but less often than with a block per 4
    weights, which was 15% slower for all its fewer instructions."""
    if DQ:
        if N == 1:
            return tl.inline_asm_elementwise(asm=_BIASED_FMA_1, constraints=_BIASED_FMA_C1,
                                             args=[q0, v0, acc], dtype=tl.float32, is_pure=True, pack=4)
        elif N == 2:
            return tl.inline_asm_elementwise(asm=_BIASED_FMA_2, constraints=_BIASED_FMA_C2,
                                             args=[q0, q1, v0, v1, acc], dtype=tl.float32, is_pure=True, pack=4)
        else:
            return tl.inline_asm_elementwise(asm=_BIASED_FMA_4, constraints=_BIASED_FMA_C4,
                                             args=[q0, q1, q2, q3, v0, v1, v2, v3, acc], dtype=tl.float32,
                                             is_pure=True, pack=4)
    acc += _biased_f32(q0) * v0
    if N >= 2:
        acc += _biased_f32(q1) * v1
    if N >= 4:
        acc += _biased_f32(q2) * v2 + _biased_f32(q3) * v3
    return acc


@triton.jit
def _biased_rows(flat_ptr, rows_ptr, rs_ptr, v_row, sv1, b0, jj, rank, offs_n, ALIGN: tl.constexpr,
                 MASKED: tl.constexpr):
    """(int8 rows jj at columns offs_n [TPR, BLOCK_N], their v * row scale [TPR, 1])."""
    if MASKED:
        jmask = jj < rank
        roff = tl.load(rows_ptr + b0 + jj, mask=jmask, other=0)
        vj = tl.load(v_row + jj * sv1, mask=jmask, other=0.0).to(tl.float32)
        vj *= tl.load(rs_ptr + b0 + jj, mask=jmask, other=0.0)
    else:       # wholly below the rank: no predicates
        roff = tl.load(rows_ptr + b0 + jj)
        vj = tl.load(v_row + jj * sv1).to(tl.float32) * tl.load(rs_ptr + b0 + jj)
    if ALIGN > 1:
        roff = tl.multiple_of(roff, ALIGN)
    ptrs = flat_ptr + roff[:, None] + offs_n[None, :]
    if MASKED:
        q = tl.load(ptrs, mask=jmask[:, None], other=0)     # row-masked: the loads stay 16 bytes wide
    else:
        q = tl.load(ptrs)
    return q, vj[:, None]


@triton.jit
def _expand_chunk_biased(flat_ptr, rows_ptr, rs_ptr, v_row, sv1, b0, j0, rank, offs_n, acc, vsum,
                         ALIGN: tl.constexpr, BR: tl.constexpr, BLOCK_N: tl.constexpr, TPR: tl.constexpr,
                         DQ: tl.constexpr, MASKED: tl.constexpr = True):
    """_expand_chunk for int8 rows (BIAS), summed into acc [TPR, BLOCK_N] and vsum [TPR, 1]
    without crossing threads: the chunk's BR rows are loaded as BR / TPR tiles of TPR rows, tile i
    holding rows j0 + i * TPR + [0, TPR). In a one-warp tile of 16-byte loads TPR threads share a
    column, so each thread owns one row of every tile, and the program reduces across threads once,
    at its end. Up to 4 tiles go into one _biased_fma."""
    if BR // TPR <= 4:
        acc, vsum = _biased_group(flat_ptr, rows_ptr, rs_ptr, v_row, sv1, b0, j0, rank, offs_n, acc, vsum, ALIGN,
                                  BR // TPR, BLOCK_N, TPR, DQ, MASKED)
    else:
        for h in tl.static_range(BR // (4 * TPR)):
            acc, vsum = _biased_group(flat_ptr, rows_ptr, rs_ptr, v_row, sv1, b0, j0 + h * 4 * TPR, rank, offs_n, acc,
                                      vsum, ALIGN, 4, BLOCK_N, TPR, DQ, MASKED)
    return acc, vsum


@triton.jit
def _biased_group(flat_ptr, rows_ptr, rs_ptr, v_row, sv1, b0, j0, rank, offs_n, acc, vsum, ALIGN: tl.constexpr,
                  G: tl.constexpr, BLOCK_N: tl.constexpr, TPR: tl.constexpr, DQ: tl.constexpr, MASKED: tl.constexpr):
    """G (1, 2 or 4) tiles of TPR rows from j0 into acc and vsum (see _expand_chunk_biased). Tiles
    past G repeat tile 0 and are not used."""
    tl.static_assert(G == 1 or G == 2 or G == 4, "BIAS groups hold 1, 2 or 4 tiles")
    jj = j0 + tl.arange(0, TPR)
    q0, v0 = _biased_rows(flat_ptr, rows_ptr, rs_ptr, v_row, sv1, b0, jj, rank, offs_n, ALIGN, MASKED)
    q1, v1, q2, v2, q3, v3 = q0, v0, q0, v0, q0, v0
    if G >= 2:
        q1, v1 = _biased_rows(flat_ptr, rows_ptr, rs_ptr, v_row, sv1, b0, jj + TPR, rank, offs_n, ALIGN, MASKED)
    if G >= 4:
        q2, v2 = _biased_rows(flat_ptr, rows_ptr, rs_ptr, v_row, sv1, b0, jj + 2 * TPR, rank, offs_n, ALIGN, MASKED)
        q3, v3 = _biased_rows(flat_ptr, rows_ptr, rs_ptr, v_row, sv1, b0, jj + 3 * TPR, rank, offs_n, ALIGN, MASKED)
    shape: tl.constexpr = [TPR, BLOCK_N]
    acc = _biased_fma(acc, q0, tl.broadcast_to(v0, shape), q1, tl.broadcast_to(v1, shape), q2,
                      tl.broadcast_to(v2, shape), q3, tl.broadcast_to(v3, shape), G, DQ)
    vsum += v0
    if G >= 2:
        vsum += v1
    if G >= 4:
        vsum += v2 + v3
    return acc, vsum


@triton.jit
def _expand_decode_kernel(y_ptr, sy0, sy1, v_ptr, sv0, sv1, svm, flat_ptr, rows_ptr, rs_ptr, meta_ptr, sm0, sm1,
                          smm, scale_ptr, slot_ptr, W0, W1, W2,
                          ALIGN: tl.constexpr, QUANT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                          PIPE: tl.constexpr, TILE_FIRST: tl.constexpr, RCLASS: tl.constexpr, PDL: tl.constexpr,
                          DQ: tl.constexpr = 0, BIAS: tl.constexpr = False, TPR: tl.constexpr = 1):
    # TILE_FIRST: consecutive column tiles of one token launch together, so the B^T rows and the
    # y row are read in long contiguous runs rather than BLOCK_N-wide pieces
    t, nt = _token_and_tile(TILE_FIRST)
    _pdl_launch_dependents(PDL)
    y_ptr, v_ptr, meta_ptr, d_out = _module(tl.program_id(2), y_ptr, sy1, v_ptr, svm, meta_ptr, smm, W0, W1, W2)
    if nt * BLOCK_N >= d_out:
        _pdl_wait(PDL)
        return
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        _pdl_wait(PDL)
        return
    mrow = meta_ptr + slot.to(tl.int64) * sm0
    b0 = tl.load(mrow + sm1)
    rank = tl.load(mrow + 3 * sm1)      # B^T rows (equal to A's rank unless A is TP-split)
    if rank == 0:
        _pdl_wait(PDL)
        return
    s = tl.load(scale_ptr + slot)
    offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < d_out
    offs_r = tl.arange(0, BLOCK_R)
    v_row = v_ptr + t.to(tl.int64) * sv0
    y_ptrs = y_ptr + t.to(tl.int64) * sy0 + offs_n * sy1
    _pdl_wait(PDL)    # v (the shrink's) and y (the base GEMM's) are read only from here on
    y = tl.load(y_ptrs, mask=nmask, other=0.0)
    if RCLASS:
        # rank classes: ranks up to BLOCK_R / 4 or / 2 load all their rows at once (row-masked,
        # so int8 loads stay 16 bytes wide and no row past the rank is read); larger ones walk
        # BLOCK_R rows at a time, each chunk reduced as it lands (no [BLOCK_R, BLOCK_N] accumulator)
        if BIAS:     # int8 rows: biased fp32, each thread's sums kept until the end (_expand_chunk_biased)
            acc = tl.zeros([TPR, BLOCK_N], dtype=tl.float32)
            vsum = tl.zeros([TPR, 1], dtype=tl.float32)
            if rank <= BLOCK_R // 4:
                acc, vsum = _expand_chunk_biased(flat_ptr, rows_ptr, rs_ptr, v_row, sv1, b0, 0, rank, offs_n,
                                                 acc, vsum, ALIGN, BLOCK_R // 4, BLOCK_N, TPR, DQ)
            elif rank <= BLOCK_R // 2:
                acc, vsum = _expand_chunk_biased(flat_ptr, rows_ptr, rs_ptr, v_row, sv1, b0, 0, rank, offs_n,
                                                 acc, vsum, ALIGN, BLOCK_R // 2, BLOCK_N, TPR, DQ)
            else:
                for j0 in range(0, rank - BLOCK_R + 1, BLOCK_R):
                    acc, vsum = _expand_chunk_biased(flat_ptr, rows_ptr, rs_ptr, v_row, sv1, b0, j0, rank, offs_n,
                                                     acc, vsum, ALIGN, BLOCK_R, BLOCK_N, TPR, DQ, False)
                if rank % BLOCK_R:
                    acc, vsum = _expand_chunk_biased(flat_ptr, rows_ptr, rs_ptr, v_row, sv1, b0, rank // BLOCK_R * BLOCK_R,
                                                     rank, offs_n, acc, vsum, ALIGN, BLOCK_R, BLOCK_N, TPR, DQ)
            delta = tl.sum(acc - 32896.0 * vsum, axis=0)
        elif rank <= BLOCK_R // 4:
            delta = _expand_chunk(flat_ptr, rows_ptr, rs_ptr, v_row, sv1, b0, 0, rank, offs_n, nmask, ALIGN, QUANT,
                                  BLOCK_R // 4, DQ)
        elif rank <= BLOCK_R // 2:
            delta = _expand_chunk(flat_ptr, rows_ptr, rs_ptr, v_row, sv1, b0, 0, rank, offs_n, nmask, ALIGN, QUANT,
                                  BLOCK_R // 2, DQ)
        else:
            delta = tl.zeros([BLOCK_N], dtype=tl.float32)
            for j0 in range(0, rank, BLOCK_R):
                delta += _expand_chunk(flat_ptr, rows_ptr, rs_ptr, v_row, sv1, b0, j0, rank, offs_n, nmask, ALIGN,
                                       QUANT, BLOCK_R, DQ)
        tl.store(y_ptrs, (y.to(tl.float32) + delta * s).to(y_ptr.dtype.element_ty), mask=nmask)
        return
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for j0 in tl.range(0, rank, BLOCK_R, num_stages=PIPE):     # PIPE: see the shrink
        jj = j0 + offs_r
        jmask = jj < rank
        roff = tl.load(rows_ptr + b0 + jj, mask=jmask, other=0)
        if ALIGN > 1:
            roff = tl.multiple_of(roff, ALIGN)
        vj = tl.load(v_row + jj * sv1, mask=jmask, other=0.0).to(tl.float32)
        if QUANT:
            vj *= tl.load(rs_ptr + b0 + jj, mask=jmask, other=0.0)
        b = _rows_f32(_load_rows(flat_ptr + roff[:, None] + offs_n[None, :], jmask[:, None] & nmask[None, :], QUANT),
                      QUANT, DQ)
        acc += b * vj[:, None]
    delta = tl.sum(acc, axis=0) * s
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _plan_item(items_ptr, n_ptr, PDL: tl.constexpr):
    """This program's item of an expand plan, after letting the next kernel launch: (token,
    module, the pair's chunks, this chunk, slot, whether there is work: inside the plan, and a pair
    with rows)."""
    i = tl.program_id(0)
    _pdl_launch_dependents(PDL)
    n = tl.load(n_ptr)
    e = tl.load(items_ptr + 2 * i)
    slot = tl.load(items_ptr + 2 * i + 1)
    t, mod, n_chunks, ch = _plan_fields(e)
    return t, mod, n_chunks, ch, slot, (i < n) & (n_chunks > 0)


@triton.jit
def _chunk_rows(rows_ptr, rs_ptr, nrows, ALIGN: tl.constexpr, NR: tl.constexpr, G: tl.constexpr):
    """A chunk's NR rows (from rows_ptr, rs_ptr) as G (1, 4 or 8) interleaved tiles of NR / G (tile
    g: rows g, g + G, ...): the tiles' first row numbers jj, their pool offsets (r0..r7) and their
    scales (w0..w7); past G they repeat the first."""
    jj = tl.arange(0, NR // G) * G
    r0, w0 = _rows_scaled(rows_ptr, rs_ptr, jj, nrows, ALIGN)
    r1, w1, r2, w2, r3, w3 = r0, w0, r0, w0, r0, w0
    r4, w4, r5, w5, r6, w6, r7, w7 = r0, w0, r0, w0, r0, w0, r0, w0
    if G >= 4:
        r1, w1 = _rows_scaled(rows_ptr, rs_ptr, jj + 1, nrows, ALIGN)
        r2, w2 = _rows_scaled(rows_ptr, rs_ptr, jj + 2, nrows, ALIGN)
        r3, w3 = _rows_scaled(rows_ptr, rs_ptr, jj + 3, nrows, ALIGN)
    if G == 8:
        r4, w4 = _rows_scaled(rows_ptr, rs_ptr, jj + 4, nrows, ALIGN)
        r5, w5 = _rows_scaled(rows_ptr, rs_ptr, jj + 5, nrows, ALIGN)
        r6, w6 = _rows_scaled(rows_ptr, rs_ptr, jj + 6, nrows, ALIGN)
        r7, w7 = _rows_scaled(rows_ptr, rs_ptr, jj + 7, nrows, ALIGN)
    return jj, (r0, r1, r2, r3, r4, r5, r6, r7), (w0, w1, w2, w3, w4, w5, w6, w7)


# The int8 expand by row chunks (TUNE key ROWS, family expand_decode_rows): the shrink's shape
# turned around. One program per item of the step's expand plan, a (token, module, chunk of
# BLOCK_R B^T rows), streams those rows across the module's full width (a 4 KB page each at
# d_out 4096) in BLOCK_N-column tiles and adds each tile's sum into y. The column-tile grid reads
# every row in BLOCK_N-byte pieces, one program each, and reached 56-64% of the bytes roofline
# where the shrink, which reads whole rows, reached 84%. A token whose rows span several chunks
# adds them with atomics (relaxed, in y's dtype: the sum's order, so its last bit, varies from
# run to run); a one-chunk token loads and stores y.
@triton.jit
def _expand_rows_kernel(y_ptr, sy0, sy1, v_ptr, sv0, sv1, svm, flat_ptr, rows_ptr, rs_ptr, meta_ptr, sm0, sm1, smm,
                        scale_ptr, items_ptr, n_ptr, W0, W1, W2,
                        ALIGN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
                        PIPE: tl.constexpr, PDL: tl.constexpr, DQ: tl.constexpr, G4: tl.constexpr = False,
                        I4: tl.constexpr = False):
    t, mod, n_chunks, ch, slot, live = _plan_item(items_ptr, n_ptr, PDL)
    if not live:        # past the plan, or a pair with no rows: y stays as it is
        _pdl_wait(PDL)
        return
    y_ptr, v_ptr, meta_ptr, d_out = _module(mod, y_ptr, sy1, v_ptr, svm, meta_ptr, smm, W0, W1, W2)
    mrow = meta_ptr + slot.to(tl.int64) * sm0
    b0 = tl.load(mrow + sm1)
    rank = tl.load(mrow + 3 * sm1)      # this layer's rows (the plan's are the most over layers)
    j0 = ch * BLOCK_R
    if j0 >= rank:
        _pdl_wait(PDL)
        return
    span = tl.cdiv(tl.cdiv(d_out, SPLIT), BLOCK_N) * BLOCK_N      # SPLIT: programs per chunk, by columns
    c_lo = tl.program_id(1) * span
    c_hi = tl.minimum(c_lo + span, d_out)
    v_row = v_ptr + t.to(tl.int64) * sv0 + j0 * sv1
    y_row = y_ptr + t.to(tl.int64) * sy0
    rows_ptr += b0 + j0
    rs_ptr += b0 + j0
    nrows = rank - j0
    s = tl.load(scale_ptr + slot)
    # the branches pick a loop built for them (a runtime choice inside the loop cost its 16-byte
    # loads and its pipelining): chunks of more than half BLOCK_R rows or not, atomics or not
    if n_chunks > 1:
        if nrows > BLOCK_R // 2:
            _expand_rows(y_row, sy1, v_row, sv1, flat_ptr, rows_ptr, rs_ptr, nrows, s, c_lo, c_hi, ALIGN, BLOCK_R,
                         BLOCK_N, PIPE, PDL, DQ, True, G4, I4)
        else:
            _expand_rows(y_row, sy1, v_row, sv1, flat_ptr, rows_ptr, rs_ptr, nrows, s, c_lo, c_hi, ALIGN, BLOCK_R // 2,
                         BLOCK_N, PIPE, PDL, DQ, True, G4, I4)
    elif nrows > BLOCK_R // 2:
        _expand_rows(y_row, sy1, v_row, sv1, flat_ptr, rows_ptr, rs_ptr, nrows, s, c_lo, c_hi, ALIGN, BLOCK_R,
                     BLOCK_N, PIPE, PDL, DQ, False, G4, I4)
    else:
        _expand_rows(y_row, sy1, v_row, sv1, flat_ptr, rows_ptr, rs_ptr, nrows, s, c_lo, c_hi, ALIGN, BLOCK_R // 2,
                     BLOCK_N, PIPE, PDL, DQ, False, G4, I4)


@triton.jit
def _expand_rows(y_row, sy1, v_row, sv1, flat_ptr, rows_ptr, rs_ptr, nrows, s, c_lo, c_hi, ALIGN: tl.constexpr,
                 NR: tl.constexpr, BLOCK_N: tl.constexpr, PIPE: tl.constexpr, PDL: tl.constexpr, DQ: tl.constexpr,
                 ATOMIC: tl.constexpr, G4: tl.constexpr, I4: tl.constexpr):
    """y[c_lo:c_hi] += s * sum over the chunk's rows j < nrows (at most NR) of v[j] * B^T row j.
    Rows are in-thread: int8 tiles of one warp per 512 columns hold each column's weights in one
    thread, so the row sum crosses no threads. Rows past nrows read offset 0 of the pool
    (unmasked: the loads stay 16 bytes wide) with v 0, which adds exactly 0 (BIAS's sums subtract
    32896 * v)."""
    # G4: the rows as 4 interleaved tiles of NR / 4 (rows g, g + 4, ...), summed by one 4-row
    # _biased_fma chain, leaving a quarter of the row sum's adds; else one tile of NR rows
    G: tl.constexpr = 4 if G4 and NR >= 4 else 1
    jj, r, w = _chunk_rows(rows_ptr, rs_ptr, nrows, ALIGN, NR, G)
    _pdl_wait(PDL)    # v (the shrink's) and y (the base GEMM's) are read only from here on
    v0 = _v_scaled(v_row, sv1, jj, nrows, w[0], s)
    v1, v2, v3 = v0, v0, v0
    if G == 4:
        v1 = _v_scaled(v_row, sv1, jj + 1, nrows, w[1], s)
        v2 = _v_scaled(v_row, sv1, jj + 2, nrows, w[2], s)
        v3 = _v_scaled(v_row, sv1, jj + 3, nrows, w[3], s)
    _add_rows(y_row, sy1, flat_ptr, r, (v0, v1, v2, v3, v0, v0, v0, v0), c_lo, c_hi, BLOCK_N, PIPE, DQ, ATOMIC, G,
              I4)


@triton.jit
def _add_rows(y_row, sy1, flat_ptr, r, v, c_lo, c_hi, BLOCK_N: tl.constexpr,
              PIPE: tl.constexpr, DQ: tl.constexpr, ATOMIC: tl.constexpr, G: tl.constexpr, I4: tl.constexpr):
    """y[c_lo:c_hi] += sum over a chunk's G (1, 4 or 8) row tiles g (pool offsets r[g], fp32 v[g]
    holding v times the row's scale and the adapter's scaling; the tiles past G are unused) of
    v[g] * rows_g, streamed BLOCK_N columns at a time (with atomics where other programs add into
    the same y row). G 8 sums each column's 8 rows in one FMA chain of two 4-row blocks: a tile of
    one row keeps half the partial sums in registers that 4 tiles of 2 rows keep."""
    GR: tl.constexpr = v[0].shape[0]
    shape: tl.constexpr = [GR, BLOCK_N // 2 if I4 else BLOCK_N]     # (int4: a byte a column pair)
    vsum = tl.sum(v[0], axis=0)
    if G >= 4:
        vsum += tl.sum(v[1] + v[2] + v[3], axis=0)
    if G == 8:
        vsum += tl.sum(v[4] + v[5] + v[6] + v[7], axis=0)
    bias = vsum * 32896.0
    if I4:      # (see _i4_fma)
        v = (v[0] * _I4_V_SCALE, v[1] * _I4_V_SCALE, v[2] * _I4_V_SCALE, v[3] * _I4_V_SCALE, v[4] * _I4_V_SCALE,
             v[5] * _I4_V_SCALE, v[6] * _I4_V_SCALE, v[7] * _I4_V_SCALE)
    v0, v1, v2, v3, v4, v5, v6, v7 = (tl.broadcast_to(v[0][:, None], shape), tl.broadcast_to(v[1][:, None], shape),
                                      tl.broadcast_to(v[2][:, None], shape), tl.broadcast_to(v[3][:, None], shape),
                                      tl.broadcast_to(v[4][:, None], shape), tl.broadcast_to(v[5][:, None], shape),
                                      tl.broadcast_to(v[6][:, None], shape), tl.broadcast_to(v[7][:, None], shape))
    zero = tl.zeros(shape, dtype=tl.float32)
    offs = tl.arange(0, BLOCK_N)
    N4: tl.constexpr = 4 if G == 8 else G       # the rows of one FMA block
    for c0 in tl.range(c_lo, c_hi, BLOCK_N, num_stages=PIPE):
        cols = c0 + offs
        # past d_out: inside the pool, never stored
        if I4:
            b = c0 // 2 + tl.arange(0, BLOCK_N // 2)     # a byte a column pair
            q0, q1, q2, q3 = _row_tiles(flat_ptr, r[0], r[1], r[2], r[3], b, N4)
            su, sl = _i4_fma(zero, zero, q0, v0, q1, v1, q2, v2, q3, v3, N4, DQ)
            if G == 8:
                q4, q5, q6, q7 = _row_tiles(flat_ptr, r[4], r[5], r[6], r[7], b, 4)
                su, sl = _i4_fma(su, sl, q4, v4, q5, v5, q6, v6, q7, v7, 4, DQ)
            d = _i4_columns(su, sl, vsum, BLOCK_N)
        else:
            q0, q1, q2, q3 = _row_tiles(flat_ptr, r[0], r[1], r[2], r[3], cols, N4)
            acc = _biased_fma(zero, q0, v0, q1, v1, q2, v2, q3, v3, N4, DQ)
            if G == 8:
                q4, q5, q6, q7 = _row_tiles(flat_ptr, r[4], r[5], r[6], r[7], cols, 4)
                acc = _biased_fma(acc, q4, v4, q5, v5, q6, v6, q7, v7, 4, DQ)
            d = tl.sum(acc, axis=0) - bias
        cm = cols < c_hi
        ptrs = y_row + cols * sy1
        if ATOMIC:
            tl.atomic_add(ptrs, d.to(y_row.dtype.element_ty), mask=cm, sem="relaxed")
        else:
            y = tl.load(ptrs, mask=cm, other=0.0)
            tl.store(ptrs, (y.to(tl.float32) + d).to(y_row.dtype.element_ty), mask=cm)


@triton.jit
def _row_tiles(flat_ptr, r0, r1, r2, r3, offs, G: tl.constexpr):
    """The G (1 or 4) tiles of a chunk's rows (offsets r*) at element offsets offs (the last three
    repeat the first where G is 1)."""
    q0 = tl.load(flat_ptr + r0[:, None] + offs[None, :])
    q1, q2, q3 = q0, q0, q0
    if G == 4:
        q1 = tl.load(flat_ptr + r1[:, None] + offs[None, :])
        q2 = tl.load(flat_ptr + r2[:, None] + offs[None, :])
        q3 = tl.load(flat_ptr + r3[:, None] + offs[None, :])
    return q0, q1, q2, q3


@triton.jit
def _i4_columns(su, sl, vsum, BLOCK_N: tl.constexpr):
    """The [BLOCK_N] columns of a chunk's int4 rows times v, in fp32, from _i4_fma's sums over the
    row tiles' bytes ([rows, BLOCK_N / 2]; vsum: the sum of all their v, unscaled). The byte tiles
    stay as loaded (a byte a column pair): _i4_fma sums each byte whole and its low nibble, the even
    (low) and odd (high) columns come out of those two sums and are interleaved once, here
    (interleaving every weight cost more than the bytes saved: benchmarks/results/lora-int4-2026-12-05)."""
    # su = 2^-69 sum v u, sl = 2^-69 sum v (lo + 8), where u = 16 (hi + 8) + lo + 8
    su = tl.sum(su, axis=0) * _I4_SUM_SCALE
    sl = tl.sum(sl, axis=0) * _I4_SUM_SCALE
    return tl.reshape(tl.join(sl - 8.0 * vsum, (su - sl) * 0.0625 - 8.0 * vsum), [BLOCK_N])


def _i4_fma_asm(n: int) -> str:
    """PTX for _i4_fma over n rows: per row one xor (each nibble to q + 8, so each byte to
    u = 16 (hi + 8) + lo + 8), per byte one prmt, which moves it alone to bits 8-15, one and, which
    keeps its low nibble, and two fmas: 17 instructions per 8 weights (int8's BIAS: 9 per 4)."""
    q0, v0, au, al = 8, 8 + n, 8 + 5 * n, 12 + 5 * n
    lines = [".reg .b32 t, z, f, g;", ".reg .f32 u0, u1, u2, u3, l0, l1, l2, l3;", "mov.b32 z, 0;"]
    for i in range(n):
        lines.append(f"xor.b32 t, ${q0 + i}, 0x88888888;")
        for c in range(4):
            v = f"${v0 + 4 * i + c}"
            lines += [f"prmt.b32 f, t, z, 0x44{c}4;", "and.b32 g, f, 0x00000F00;",
                      f"fma.rn.f32 u{c}, f, {v}, {f'${au + c}' if i == 0 else f'u{c}'};",
                      f"fma.rn.f32 l{c}, g, {v}, {f'${al + c}' if i == 0 else f'l{c}'};"]
    lines += [f"mov.b32 ${c}, u{c};" for c in range(4)] + [f"mov.b32 ${4 + c}, l{c};" for c in range(4)]
    return "{\n" + "\n".join(lines) + "\n}"


_I4_FMA_1, _I4_FMA_2, _I4_FMA_4 = (tl.constexpr(_i4_fma_asm(n)) for n in (1, 2, 4))
_I4_FMA_C1, _I4_FMA_C2, _I4_FMA_C4 = (tl.constexpr(",".join(["=r"] * 8 + ["r"] * (5 * n + 8))) for n in (1, 2, 4))
# a byte at bits 8-15 of an fp32 is worth byte * 2^-141; v is scaled by 2^72, so the sums hold 2^-69 of
# theirs: products far from fp32's subnormals for any |v * w| above ~1e-17 and no v near its overflow
_I4_BYTE_UNIT, _I4_V_SCALE, _I4_SUM_SCALE = tl.constexpr(2.0 ** -141), tl.constexpr(2.0 ** 72), tl.constexpr(2.0 ** 69)


@triton.jit
def _i4_subnormals(q):
    """(u, lo + 8) of int4 bytes q as fp32 numbers u * 2^-141 and (lo + 8) * 2^-141: the bit
    patterns u << 8 and (lo + 8) << 8, which are subnormal, so their value is the integer times
    2^-149 exactly (what _i4_fma's prmt and and build)."""
    u = (q.to(tl.int32) & 0xFF) ^ 0x88
    return u.to(tl.float32) * _I4_BYTE_UNIT, (u & 15).to(tl.float32) * _I4_BYTE_UNIT


@triton.jit
def _i4_fma(acc_u, acc_l, q0, v0, q1, v1, q2, v2, q3, v3, N: tl.constexpr, DQ: tl.constexpr):
    """(acc_u + sum over the first N rows i of u_i 2^-141 v_i, acc_l + the same of (lo_i + 8)) for
    int4 bytes q_i, u_i the byte with both nibbles biased by 8 (the int4 decode expand; v holds
    2^72 v). A byte's bits as an fp32 number are subnormal, worth the integer times 2^-149 with no
    offset: one fp32 number per weight from one instruction, and exact products, where int8's
    BIAS (_biased_fma) builds 2^15 + q, whose offset would leave int4's sums ~8 bits of precision
    (the FMA pipe takes subnormals at full rate). The caller recovers the columns (_i4_columns).
    PTX where DQ (the interpreter runs none)."""
    if DQ:
        if N == 1:
            return tl.inline_asm_elementwise(asm=_I4_FMA_1, constraints=_I4_FMA_C1, args=[q0, v0, acc_u, acc_l],
                                             dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
        elif N == 2:
            return tl.inline_asm_elementwise(asm=_I4_FMA_2, constraints=_I4_FMA_C2,
                                             args=[q0, q1, v0, v1, acc_u, acc_l], dtype=(tl.float32, tl.float32),
                                             is_pure=True, pack=4)
        else:
            return tl.inline_asm_elementwise(asm=_I4_FMA_4, constraints=_I4_FMA_C4,
                                             args=[q0, q1, q2, q3, v0, v1, v2, v3, acc_u, acc_l],
                                             dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
    fu, fl = _i4_subnormals(q0)
    acc_u += fu * v0
    acc_l += fl * v0
    if N >= 2:
        fu, fl = _i4_subnormals(q1)
        acc_u += fu * v1
        acc_l += fl * v1
    if N >= 4:
        fu, fl = _i4_subnormals(q2)
        acc_u += fu * v2
        acc_l += fl * v2
        fu, fl = _i4_subnormals(q3)
        acc_u += fu * v3
        acc_l += fl * v3
    return acc_u, acc_l


@triton.jit
def _rows_scaled(rows_ptr, rs_ptr, jj, nrows, ALIGN: tl.constexpr):
    """(offsets of a chunk's rows jj, their scales); rows past nrows: offset 0, scale 0."""
    jm = jj < nrows
    roff = tl.load(rows_ptr + jj, mask=jm, other=0)
    if ALIGN > 1:
        roff = tl.multiple_of(roff, ALIGN)
    return roff, tl.load(rs_ptr + jj, mask=jm, other=0.0)


@triton.jit
def _v_scaled(v_row, sv1, jj, nrows, rs, s):
    """v of a chunk's rows jj times their row scale and the adapter's scaling, fp32."""
    return tl.load(v_row + jj * sv1, mask=jj < nrows, other=0.0).to(tl.float32) * rs * s

# One thread of the program asks the L2 for a whole row (the TMA unit's bulk prefetch, sm_90; nothing waits for
# it): every thread holds a [1] tensor, so the predicate keeps the request to one
_PREFETCH_L2_ASM = tl.constexpr("""{
        .reg .pred p;
        .reg .b32 t;
        mov.u32 t, %tid.x;
        setp.eq.u32 p, t, 0;
        @p cp.async.bulk.prefetch.L2.global [$1], $2;
        mov.b32 $0, 0;
        }""")


@triton.jit
def _prefetch_rows(flat_ptr, rows_ptr, nrows, nbytes, NR: tl.constexpr):
    """Bulk L2 prefetches of the first min(nrows, NR) rows at pool offsets rows_ptr[j] (16-byte
    aligned), nbytes (a multiple of 16) each: one instruction a row, so the program's whole chunk is
    in flight from its start where its pipelined loop keeps PIPE - 1 tiles (PTX: GPU only)."""
    one = tl.zeros([1], dtype=tl.int32)
    for j in tl.static_range(NR):
        if j < nrows:
            tl.inline_asm_elementwise(asm=_PREFETCH_L2_ASM, constraints="=r,l,r",
                                      args=[flat_ptr + tl.load(rows_ptr + j) + one, one + nbytes], dtype=tl.int32,
                                      is_pure=False, pack=1)


@triton.jit
def _row_tiles_of(v, G: tl.constexpr):
    """v [NR] of a chunk's rows as _chunk_rows's G tiles (tile g: rows g, g + G, ...; past G the
    first again): a tuple of 8 [NR / G] tensors."""
    v0, v1, v2, v3 = v, v, v, v
    v4, v5, v6, v7 = v, v, v, v
    if G >= 4:
        ev, od = tl.split(tl.reshape(v, [v.shape[0] // 2, 2]))      # rows 0, 2, 4, ... and 1, 3, 5, ...
        v0, v2 = tl.split(tl.reshape(ev, [v.shape[0] // 4, 2]))
        v1, v3 = tl.split(tl.reshape(od, [v.shape[0] // 4, 2]))
        v4, v5, v6, v7 = v0, v0, v0, v0
        if G == 8:      # (8 rows: v0 holds rows 0 and 4, v2 2 and 6, v1 1 and 5, v3 3 and 7)
            v0, v4 = tl.split(tl.reshape(v0, [1, 2]))
            v2, v6 = tl.split(tl.reshape(v2, [1, 2]))
            v1, v5 = tl.split(tl.reshape(v1, [1, 2]))
            v3, v7 = tl.split(tl.reshape(v3, [1, 2]))
    return v0, v1, v2, v3, v4, v5, v6, v7


# Shrink and expand in one program (TUNE key FUSED, families fused_decode_int8 / _int4; lora_apply):
# a token's delta is the sum over rank rows j of (x . A row j) * B^T row j, so a chunk of BLOCK_R
# rank rows needs no other program's v. One program per item of the step's expand plan, a (token,
# module, chunk), streams the chunk's A rows over d_in, keeps its v in registers and streams the
# same rows of B^T into y (atomics where the token has several chunks). A group's LoRA is one
# launch instead of two: one address chain per chunk instead of two, no v round trip, and one
# launch's ramp and tail instead of two, which is what the split kernels' time beyond their bytes
# was (benchmarks/KERNELS.md). v stays in fp32 (the split kernels round it to x's dtype).
@triton.jit
def _fused_decode_kernel(x_ptr, sx0, sx1, y_ptr, sy0, sy1, flat_ptr, rows_ptr, rs_ptr, meta_ptr, sm0, sm1, smm,
                         scale_ptr, items_ptr, n_ptr, d_in, W0, W1, W2,
                         ALIGN: tl.constexpr, QUANT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_N: tl.constexpr, PIPE: tl.constexpr, PIPE_E: tl.constexpr, PDL: tl.constexpr,
                         DQ: tl.constexpr, DQ_E: tl.constexpr, G4: tl.constexpr, PREFETCH: tl.constexpr = 0,
                         G8: tl.constexpr = False, SUB: tl.constexpr = 1):
    t, mod, n_chunks, ch, slot, live = _plan_item(items_ptr, n_ptr, PDL)
    if not live:        # past the plan, or a pair with no rows: y stays as it is
        _pdl_wait(PDL)
        return
    y_ptr, _unused, meta_ptr, d_out = _module(mod, y_ptr, sy1, y_ptr, 0, meta_ptr, smm, W0, W1, W2)
    mrow = meta_ptr + slot.to(tl.int64) * sm0
    a0 = tl.load(mrow)
    b0 = tl.load(mrow + sm1)
    rank = tl.load(mrow + 3 * sm1)      # this layer's rows (A's and B^T's: no tensor parallelism here)
    j0 = ch * BLOCK_R
    if j0 >= rank:
        _pdl_wait(PDL)
        return
    nrows = rank - j0
    # the chunk's A rows in order, and its B^T rows as the expand's G interleaved tiles
    ra, wa = _rows_scaled(rows_ptr + a0 + j0, rs_ptr + a0 + j0, tl.arange(0, BLOCK_R), nrows, ALIGN)
    G: tl.constexpr = 8 if G8 and BLOCK_R == 8 else (4 if (G4 or G8) and BLOCK_R >= 4 else 1)
    _jj, r, w = _chunk_rows(rows_ptr + b0 + j0, rs_ptr + b0 + j0, nrows, ALIGN, BLOCK_R, G)
    s = tl.load(scale_ptr + slot)
    # PREFETCH (ALIGN 16 only): bit 1 the chunk's A rows, bit 2 its B^T rows, asked of the L2 before the wait
    if PREFETCH % 2 == 1 and ALIGN == 16:
        _prefetch_rows(flat_ptr, rows_ptr + a0 + j0, nrows, (d_in // QUANT + 15) // 16 * 16, BLOCK_R)
    if PREFETCH // 2 == 1 and ALIGN == 16:
        _prefetch_rows(flat_ptr, rows_ptr + b0 + j0, nrows, (d_out // QUANT + 15) // 16 * 16, BLOCK_R)
    _pdl_wait(PDL)    # x (the norm's) and y (the base GEMM's) are read only from here on
    # rows past nrows read pool offset 0 with scale 0: v exactly 0 there
    v = _shrink_rows(x_ptr + t.to(tl.int64) * sx0, sx1, flat_ptr, ra, tl.arange(0, BLOCK_R) < nrows, d_in, QUANT,
                     BLOCK_R, BLOCK_K, PIPE, DQ, SUB) * wa * s
    vt = _row_tiles_of(v, G)
    vt = (vt[0] * w[0], vt[1] * w[1], vt[2] * w[2], vt[3] * w[3], vt[4] * w[4], vt[5] * w[5], vt[6] * w[6],
          vt[7] * w[7])
    y_row = y_ptr + t.to(tl.int64) * sy0
    if n_chunks > 1:
        _add_rows(y_row, sy1, flat_ptr, r, vt, 0, d_out, BLOCK_N, PIPE_E, DQ_E, True, G, QUANT == 2)
    else:
        _add_rows(y_row, sy1, flat_ptr, r, vt, 0, d_out, BLOCK_N, PIPE_E, DQ_E, False, G, QUANT == 2)


# ---------------------------------------------------------------------------------------------
# grouped decode (one token per request, tokens sorted by slot): tiles of tokens, tensor cores
# ---------------------------------------------------------------------------------------------
# A program owns a tile of BLOCK_M consecutive tokens and walks the distinct slots in it (most
# tiles hold one or two when the batch is sorted); per slot it runs one masked tl.dot over the
# tile, so an adapter's rows are read once per tile rather than once per token. The grid does not
# depend on how many adapters there are, so CUDA graphs capture it once per batch size.
@triton.jit
def _shrink_grouped_kernel(x_ptr, sx0, sx1, flat_ptr, rows_ptr, rs_ptr, meta_ptr, sm0, sm1, smm, slot_ptr,
                           v_ptr, sv0, sv1, svm, T, d_in, max_rank, k_split,
                           ALIGN: tl.constexpr, QUANT: tl.constexpr, IEEE: tl.constexpr, SPLIT_K: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    mt = tl.program_id(0)
    rt = tl.program_id(1) // SPLIT_K    # (rank tile, K split) folded into one grid axis
    ks = tl.program_id(1) % SPLIT_K
    mod = tl.program_id(2)
    meta_ptr += mod * smm
    v_ptr += mod * svm
    BIG: tl.constexpr = 2147483647
    offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < T
    slots = tl.load(slot_ptr + offs_m, mask=mmask, other=-1)
    offs_r = rt * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * sx0
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)   # rows of other slots see x = 0
    k_lo = ks * k_split
    k_hi = tl.minimum(d_in, k_lo + k_split)
    work = 0
    cur = tl.min(tl.where(slots >= 0, slots, BIG), axis=0)
    while cur < BIG:
        mrow = meta_ptr + cur.to(tl.int64) * sm0
        a0 = tl.load(mrow)
        rank = tl.load(mrow + 2 * sm1)
        if rt * BLOCK_R < rank:
            work = 1
            sel = slots == cur
            rmask = offs_r < rank
            roff = tl.load(rows_ptr + a0 + offs_r, mask=rmask, other=0)
            if ALIGN > 1:
                roff = tl.multiple_of(roff, ALIGN)
            if QUANT:
                rs = tl.load(rs_ptr + a0 + offs_r, mask=rmask, other=0.0)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                kk = k0 + offs_k
                kmask = kk < k_hi
                xt = tl.load(x_rows + kk[None, :] * sx1, mask=sel[:, None] & kmask[None, :], other=0.0)
                # A^T tile [BLOCK_K, BLOCK_R]
                if QUANT == 2:
                    at = tl.trans(_load_i4(flat_ptr + roff, k0, BLOCK_K))
                else:
                    at = _load_rows(flat_ptr + roff[None, :] + kk[:, None], kmask[:, None] & rmask[None, :], QUANT)
                if QUANT:
                    at = _dequant(at, rs[None, :], xt.dtype)
                if IEEE:
                    acc = tl.dot(xt.to(tl.float32), at.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(xt, at.to(xt.dtype), acc)
        cur = tl.min(tl.where(slots > cur, slots, BIG), axis=0)
    v_ptrs = v_ptr + offs_m.to(tl.int64)[:, None] * sv0 + offs_r[None, :] * sv1
    v_mask = mmask[:, None] & (offs_r < max_rank)[None, :]
    if SPLIT_K == 1:
        tl.store(v_ptrs, acc.to(v_ptr.dtype.element_ty), mask=v_mask)
    elif work > 0:     # partial sums into a zeroed fp32 buffer; idle tiles add nothing
        tl.atomic_add(v_ptrs, acc, mask=v_mask)


@triton.jit
def _expand_grouped_kernel(y_ptr, sy0, sy1, v_ptr, sv0, sv1, svm, flat_ptr, rows_ptr, rs_ptr, meta_ptr, sm0, sm1,
                           smm, scale_ptr, slot_ptr, T, W0, W1, W2,
                           ALIGN: tl.constexpr, QUANT: tl.constexpr, IEEE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    mt = tl.program_id(0)
    nt = tl.program_id(1)
    y_ptr, v_ptr, meta_ptr, d_out = _module(tl.program_id(2), y_ptr, sy1, v_ptr, svm, meta_ptr, smm, W0, W1, W2)
    if nt * BLOCK_N >= d_out:
        return
    BIG: tl.constexpr = 2147483647
    offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < T
    slots = tl.load(slot_ptr + offs_m, mask=mmask, other=-1)
    cur = tl.min(tl.where(slots >= 0, slots, BIG), axis=0)
    if cur == BIG:          # only base tokens in this tile
        return
    offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < d_out
    offs_k = tl.arange(0, BLOCK_K)
    v_rows = v_ptr + offs_m.to(tl.int64)[:, None] * sv0
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * sy0 + offs_n[None, :] * sy1
    ymask = (mmask & (slots >= 0))[:, None] & nmask[None, :]
    y = tl.load(y_ptrs, mask=ymask, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    while cur < BIG:
        mrow = meta_ptr + cur.to(tl.int64) * sm0
        b0 = tl.load(mrow + sm1)
        rank = tl.load(mrow + 3 * sm1)  # B^T rows (equal to A's rank unless A is TP-split)
        sel = slots == cur
        part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for j0 in range(0, rank, BLOCK_K):
            jj = j0 + offs_k
            jmask = jj < rank
            vt = tl.load(v_rows + jj[None, :] * sv1, mask=sel[:, None] & jmask[None, :], other=0.0)
            roff = tl.load(rows_ptr + b0 + jj, mask=jmask, other=0)
            if ALIGN > 1:
                roff = tl.multiple_of(roff, ALIGN)
            bt = _bt_tile(flat_ptr, roff, rs_ptr + b0 + jj, jmask, offs_n, nmask, nt * BLOCK_N, BLOCK_N, QUANT, vt.dtype)
            part = _dot(vt, bt, part, IEEE)
        acc += part * tl.load(scale_ptr + cur)
        cur = tl.min(tl.where(slots > cur, slots, BIG), axis=0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=ymask)


# ---------------------------------------------------------------------------------------------
# prefill (segments of many tokens): SGMV-like, tensor cores
# ---------------------------------------------------------------------------------------------
@triton.jit
def _bt_tile(flat_ptr, roff, rs_ptrs, jmask, offs_n, nmask, c0, BLOCK_N: tl.constexpr, QUANT: tl.constexpr,
             dtype: tl.constexpr):
    """A B^T tile [rows, BLOCK_N] of the rows at pool offsets roff (rows past jmask: zeros or scale
    0), columns c0 + [0, BLOCK_N) (offs_n; past nmask: never stored), in dtype with the rows' scales
    (rs_ptrs) where they are quantized."""
    if QUANT == 2:
        bt = _load_i4(flat_ptr + roff, c0, BLOCK_N)
    else:
        bt = _load_rows(flat_ptr + roff[:, None] + offs_n[None, :], jmask[:, None] & nmask[None, :], QUANT)
    if QUANT:
        bt = _dequant(bt, tl.load(rs_ptrs, mask=jmask, other=0.0)[:, None], dtype)
    return bt


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b on the tensor cores in a's dtype, or in fp32 IEEE (the fp32 tests' reference precision)."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b.to(a.dtype), acc)


@triton.jit
def _shrink_seg_kernel(x_ptr, sx0, sx1, flat_ptr, rows_ptr, rs_ptr, meta_ptr, sm0, sm1, smm, indptr_ptr,
                       seg_slot_ptr, v_ptr, sv0, sv1, svm, d_in, max_rank, k_split, n_tiles, part_ptr, sps, cnt_ptr,
                       ALIGN: tl.constexpr, QUANT: tl.constexpr, IEEE: tl.constexpr, SPLIT_K: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, I4_SPLIT: tl.constexpr = False):
    # SPLIT_K > 1: program ks sums d_in range ks of its tile into part[ks] (fp32, laid out as v at
    # split stride sps); the tile's last program to finish (a counter per tile, cnt_ptr, left at 0
    # again) adds the partials in split order and writes v. One launch, and the same sum every run,
    # where a zeroed buffer, fp32 atomics and a cast took three launches in no fixed order.
    g = tl.program_id(0)
    mt = tl.program_id(1)
    ks = tl.program_id(2) % SPLIT_K
    nt = tl.program_id(2) // SPLIT_K     # (module, rank tile) folded into one grid axis
    mod = nt // n_tiles
    nt = nt % n_tiles
    meta_ptr += mod * smm
    v_ptr += mod * svm
    s0 = tl.load(indptr_ptr + g)
    s1 = tl.load(indptr_ptr + g + 1)
    m0 = s0 + mt * BLOCK_M
    if m0 >= s1:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mmask = offs_m < s1
    offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    v_ptrs = v_ptr + offs_m.to(tl.int64)[:, None] * sv0 + offs_n[None, :] * sv1
    v_mask = mmask[:, None] & (offs_n < max_rank)[None, :]
    slot = tl.load(seg_slot_ptr + g)
    rank = 0
    a0 = 0
    if slot >= 0:
        mrow = meta_ptr + slot.to(tl.int64) * sm0
        a0 = tl.load(mrow)
        rank = tl.load(mrow + 2 * sm1)
    if nt * BLOCK_N >= rank:
        if ks == 0:       # every split of the tile is here: one writes the zeros, none counts
            tl.store(v_ptrs, tl.zeros([BLOCK_M, BLOCK_N], dtype=v_ptr.dtype.element_ty), mask=v_mask)
        return
    nmask = offs_n < rank
    roff = tl.load(rows_ptr + a0 + offs_n, mask=nmask, other=0)
    if ALIGN > 1:
        roff = tl.multiple_of(roff, ALIGN)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * sx0
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_lo = ks * k_split
    k_hi = tl.minimum(d_in, k_lo + k_split)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + offs_k
        kmask = kk < k_hi
        xt = tl.load(x_rows + kk[None, :] * sx1, mask=mmask[:, None] & kmask[None, :], other=0.0)
        # A^T tile [BLOCK_K, BLOCK_N]
        if QUANT == 2 and I4_SPLIT:
            # I4_SPLIT: x's tile splits into its even and odd columns (in-thread pairs) and each nibble
            # plane takes its own dot, where interleaving the nibbles reorders the whole weight tile
            xe, xo = tl.split(tl.reshape(xt, [BLOCK_M, BLOCK_K // 2, 2]))
            lo, hi = _i4_nibbles(tl.load(flat_ptr + roff[None, :] + (k0 // 2 + tl.arange(0, BLOCK_K // 2))[:, None]))
            acc = _dot(xe, _i8_to_f16(lo), acc, IEEE)
            acc = _dot(xo, _i8_to_f16(hi), acc, IEEE)
        else:
            if QUANT == 2:
                at = tl.trans(_load_i4(flat_ptr + roff, k0, BLOCK_K))
            else:
                at = _load_rows(flat_ptr + roff[None, :] + kk[:, None], kmask[:, None] & nmask[None, :], QUANT)
            if QUANT:
                at = _i8_to_f16(at)     # exact: the scales come after the dot
            acc = _dot(xt, at, acc, IEEE)
    if QUANT:     # one adapter per program: the row scales are the accumulator's column scales
        acc *= tl.load(rs_ptr + a0 + offs_n, mask=nmask, other=0.0)[None, :]
    if SPLIT_K == 1:
        tl.store(v_ptrs, acc.to(v_ptr.dtype.element_ty), mask=v_mask)
    else:
        part = part_ptr + mod * svm + offs_m.to(tl.int64)[:, None] * sv0 + offs_n[None, :] * sv1
        tl.store(part + ks * sps, acc, mask=v_mask)
        tile = (g * tl.num_programs(1) + mt) * (tl.num_programs(2) // SPLIT_K) + tl.program_id(2) // SPLIT_K
        tl.debug_barrier()      # every thread's partial is written before the count is released
        if tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel") == SPLIT_K - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k in range(SPLIT_K):      # .cg: the partials come from other SMs, through the L2
                total += tl.load(part + k * sps, mask=v_mask, other=0.0, cache_modifier=".cg")
            tl.store(v_ptrs, total.to(v_ptr.dtype.element_ty), mask=v_mask)
            tl.atomic_xchg(cnt_ptr + tile, 0)


@triton.jit
def _expand_seg_kernel(y_ptr, sy0, sy1, v_ptr, sv0, sv1, svm, flat_ptr, rows_ptr, rs_ptr, meta_ptr, sm0, sm1,
                       smm, scale_ptr, indptr_ptr, seg_slot_ptr, W0, W1, W2, n_tiles,
                       ALIGN: tl.constexpr, QUANT: tl.constexpr, IEEE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       I4_SPLIT: tl.constexpr = False):
    g = tl.program_id(0)
    mt = tl.program_id(1)
    nt = tl.program_id(2) % n_tiles      # (module, column tile) folded into one grid axis
    y_ptr, v_ptr, meta_ptr, d_out = _module(tl.program_id(2) // n_tiles, y_ptr, sy1, v_ptr, svm, meta_ptr, smm,
                                            W0, W1, W2)
    if nt * BLOCK_N >= d_out:
        return
    s0 = tl.load(indptr_ptr + g)
    s1 = tl.load(indptr_ptr + g + 1)
    m0 = s0 + mt * BLOCK_M
    if m0 >= s1:
        return
    slot = tl.load(seg_slot_ptr + g)
    if slot < 0:
        return
    mrow = meta_ptr + slot.to(tl.int64) * sm0
    b0 = tl.load(mrow + sm1)
    rank = tl.load(mrow + 3 * sm1)      # B^T rows (equal to A's rank unless A is TP-split)
    if rank == 0:
        return
    s = tl.load(scale_ptr + slot)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mmask = offs_m < s1
    offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < d_out
    offs_k = tl.arange(0, BLOCK_K)
    v_rows = v_ptr + offs_m.to(tl.int64)[:, None] * sv0
    # y is the bulk of the bytes: issue its load first so it overlaps the weight loads and the dot
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * sy0 + offs_n[None, :] * sy1
    ymask = mmask[:, None] & nmask[None, :]
    y = tl.load(y_ptrs, mask=ymask, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # I4_SPLIT: the even (low nibble) and odd (high) columns summed apart and interleaved once, after the loop
    acc_e = tl.zeros([BLOCK_M, BLOCK_N // 2], dtype=tl.float32)
    acc_o = acc_e
    for j0 in range(0, rank, BLOCK_K):
        jj = j0 + offs_k
        jmask = jj < rank
        vt = tl.load(v_rows + jj[None, :] * sv1, mask=mmask[:, None] & jmask[None, :], other=0.0)
        roff = tl.load(rows_ptr + b0 + jj, mask=jmask, other=0)
        if ALIGN > 1:
            roff = tl.multiple_of(roff, ALIGN)
        # B^T tile [BLOCK_K, BLOCK_N]
        if QUANT == 2 and I4_SPLIT:
            rsc = tl.load(rs_ptr + b0 + jj, mask=jmask, other=0.0)[:, None]
            lo, hi = _i4_nibbles(tl.load(flat_ptr + roff[:, None] + (nt * BLOCK_N // 2 + tl.arange(0, BLOCK_N // 2))[None, :]))
            acc_e = _dot(vt, _dequant(lo, rsc, vt.dtype), acc_e, IEEE)
            acc_o = _dot(vt, _dequant(hi, rsc, vt.dtype), acc_o, IEEE)
        else:
            bt = _bt_tile(flat_ptr, roff, rs_ptr + b0 + jj, jmask, offs_n, nmask, nt * BLOCK_N, BLOCK_N, QUANT, vt.dtype)
            acc = _dot(vt, bt, acc, IEEE)
    if QUANT == 2 and I4_SPLIT:
        acc = tl.reshape(tl.join(acc_e, acc_o), [BLOCK_M, BLOCK_N])
    tl.store(y_ptrs, (y.to(tl.float32) + acc * s).to(y_ptr.dtype.element_ty), mask=ymask)


# ---------------------------------------------------------------------------------------------
# host wrappers
# ---------------------------------------------------------------------------------------------
def _seg_block_m(batch: LoraBatch, n_tiles: int) -> int:
    """Token tile for the segment schedule: large enough for the tensor cores, small enough that
    short segments waste little and the grid (about) fills the machine."""
    G = batch.seg_slot.numel()
    for bm, need in ((64, 264), (32, 96)):
        if batch.max_seg_len >= bm and G * triton.cdiv(batch.max_seg_len, bm) * n_tiles >= need:
            return bm
    return 16


def _shrink_seg_tiles(cfg: dict, batch: LoraBatch, units: int, d_in: int, sms: int) -> tuple[int, int]:
    """(token tile, d_in splits) of the segment shrink. TUNE keys BLOCK_M / SPLIT_K fix them.

    Each program walks its d_in range alone, so the grid should hold about SPLIT_FILL x SMs
    programs (``units`` tiles per token tile: modules x rank tiles): the largest token tile that
    still gives MIN_TILES tiles, then d_in split in two while the programs stay within that. H200
    (benchmarks/results/prefill-tiles-2026-12-04-h200): 1024 tokens in 4 segments 13.4 vs 17.6 us
    (64 rows, 4 splits), 4096 in 64 segments 24.8 vs 32.3 (64 rows, no split), 512 in one 10.4 vs
    12.9 (16 rows, 4 splits). SEG_RULE 0: the earlier rule (token tile by _seg_block_m, splits only
    while the tiles fill under a quarter of the SMs)."""
    G = batch.seg_slot.numel()
    L = batch.max_seg_len
    old = cfg.get("SEG_RULE", 1) == 0
    bm = cfg["BLOCK_M"]
    if bm is None and old:
        bm = _seg_block_m(batch, units)
    elif bm is None:
        bm = next((b for b in (64, 32) if L >= b and G * triton.cdiv(L, b) * units >= cfg.get("MIN_TILES", 32)), 16)
    split = cfg.get("SPLIT_K")
    if split is None:
        # split while the programs stay within the bound: a quarter of the SMs (old), or
        # SPLIT_FILL x SMs after this doubling
        bound = sms / 4 if old else cfg.get("SPLIT_FILL", 1.0) * sms / 2
        tiles = G * triton.cdiv(L, bm) * units
        split = 1
        while tiles * split <= bound and split < 16 and d_in >= 2 * split * 256:
            split *= 2
    return bm, split


_COUNTERS: dict = {}


def _tile_counters(device, n: int) -> torch.Tensor:
    """Per-tile int32 counters of the split-K segment shrink, zero between launches (each tile's
    last program resets its own), one buffer per device: launches that use them run on one stream."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = _COUNTERS[device] = torch.zeros(max(4096, _p2(n)), dtype=torch.int32, device=device)
    return buf


def _split_k(d_in: int, block_k: int, split: int) -> tuple[int, int]:
    """d_in cut into about ``split`` ranges of whole BLOCK_K tiles: (splits, elements per split)."""
    k_split = triton.cdiv(triton.cdiv(d_in, split), block_k) * block_k
    return triton.cdiv(d_in, k_split), k_split


def _decode_tiles(kind: str, quant: int, T: int) -> dict:
    """TUNE entry of the decode schedule ("shrink" or "expand"): int8 and int4 rows take their own
    tiles from INT8_SMALL_TILES_MIN_T tokens up (int4 those of int8 where it has none)."""
    if not quant or T < INT8_SMALL_TILES_MIN_T:
        return TUNE[f"{kind}_decode"]
    return TUNE.get(f"{kind}_decode_int4", TUNE[f"{kind}_decode_int8"]) if quant == 2 else TUNE[f"{kind}_decode_int8"]


def _rows_tiles(quant: int) -> dict:
    """TUNE entry of the decode expand by row chunks."""
    return TUNE["expand_decode_rows_int4"] if quant == 2 else TUNE["expand_decode_rows"]


def _decode_grid(cfg: dict, tiles: int, T: int, M: int) -> tuple[tuple[int, int, int], bool]:
    """The decode schedule's grid and whether it is tile-first (TUNE key TILE_FIRST: one token's
    tiles launch together; grid axis 1 holds fewer than 2^16, so huge batches stay token-first)."""
    first = bool(cfg.get("TILE_FIRST", False)) and T < 65536
    return ((tiles, T, M) if first else (T, tiles, M)), first


_TRITON_PDL = hasattr(getattr(getattr(tl, "extra", None), "cuda", None), "gdc_wait")


def _pdl_args(cfg: dict, device) -> dict:
    """A decode launch's PDL arguments: the kernel's constexpr and Triton's launch flag, on when
    the TUNE entry asks (key PDL), the GPU has programmatic dependent launch (sm_90+) and this
    Triton has it (3.4+: gdc_wait and launch_pdl)."""
    on = bool(cfg.get("PDL", False)) and device.type == "cuda" and _TRITON_PDL and _props(device).major >= 9
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


# PTX_DQ 2 sums d_in / BLOCK_K products per thread in fp16, each at most |x|: up to this many steps (d_in
# 8192 at BLOCK_K 512) the sums stay inside fp16's range for activations under 4096; wider inputs (an MLP's
# down_proj) take level 1.
FP16_SUM_STEPS = 16


def _ptx_dq(cfg: dict, quant: bool, device, fp16_products: bool = False) -> int:
    """How a decode launch dequantizes int8 rows (TUNE key PTX_DQ): 0 in Triton's integer ops;
    1 in PTX (_i8_to_f16_ptx), fp32 FMAs; 2 (the shrink with fp16 activations only; others take 1)
    in PTX with fp16x2 products (_i8_fma_f16). Only on a GPU: the interpreter runs no inline
    assembly."""
    level = int(cfg.get("PTX_DQ", 0)) if quant and device.type == "cuda" else 0
    return min(level, 2 if fp16_products else 1)


def _quant(flat: torch.Tensor, rows: torch.Tensor, row_scale: torch.Tensor | None) -> tuple[int, torch.Tensor]:
    """(QUANT: 0 rows in the model's dtype, 1 int8, 2 int4 (uint8 ``flat``); the scale pointer a
    launch passes: the row scales, or any tensor when unused)."""
    if flat.dtype not in (torch.int8, torch.uint8):
        return 0, rows
    assert row_scale is not None, "quantized adapter rows need their row_scale"
    return (2 if flat.dtype == torch.uint8 else 1), row_scale


def _module_widths(widths: tuple[int, ...] | None, d_out: int, M: int) -> tuple[tuple[int, ...], int, int, int]:
    """(the M modules' output widths, as W0, W1, W2 too: 0 past M) of an expand into d_out columns;
    None: one module, all of them."""
    widths = tuple(widths) if widths is not None else (d_out,)
    assert len(widths) == M <= 3 and sum(widths) == d_out, (widths, M, d_out)
    return (widths, *(widths + (0, 0))[:3])


def _modules(meta: torch.Tensor) -> torch.Tensor:
    """meta as [slots, modules, 4]: a single (layer, module) view is one module."""
    return meta if meta.dim() == 3 else meta.unsqueeze(1)


def lora_shrink(x: torch.Tensor, flat: torch.Tensor, rows: torch.Tensor, meta: torch.Tensor,
                batch: LoraBatch, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """v[t, :r] = x[t] @ A_slot(t)^T; zeros past the adapter's rank and for base tokens.

    x: [T, d_in]. meta [slots, 4]: one module, returns [T, batch.max_rank]; meta [slots, M, 4]
    (M <= 3 modules reading the same x, e.g. q/k/v): one launch, returns [T, M, batch.max_rank].
    In x's dtype, fp32 accumulation. int8 ``flat``: row j is ``flat[...] * row_scale[start + j]``.
    """
    T, d_in = x.shape
    R = batch.max_rank
    quant, rs = _quant(flat, rows, row_scale)
    meta3 = _modules(meta)
    M = meta3.shape[1]
    v3 = torch.empty(T, M, R, dtype=x.dtype, device=x.device)
    v = v3 if meta.dim() == 3 else v3.view(T, R)
    if T == 0 or R == 0:
        return v
    assert M <= 3, "at most three modules per launch"
    align = _row_align(flat)
    sm0, smm, sm1 = meta3.stride()
    sv0, svm, sv1 = v3.stride()
    out = v3
    if batch.max_seg_len <= 1 and batch.grouped:
        cfg = TUNE["shrink_grouped"]
        BLOCK_M, BLOCK_R = cfg["BLOCK_M"], cfg["BLOCK_R"]
        BLOCK_K = min(cfg["BLOCK_K"], max(16, _p2(d_in))) if x.dtype != torch.float32 else 32
        tiles = triton.cdiv(T, BLOCK_M) * triton.cdiv(R, BLOCK_R) * M
        # A few adapters over a batch leave few tiles, each walking all of d_in alone (18 us a
        # launch at 192 tokens over 5 adapters on the H100, for ~0.1 MB of rows): split d_in until
        # there are `programs_per_sm` programs per SM (fixed by the shapes, so graphs capture it).
        split = cfg.get("SPLIT_K")
        if split is None:
            split = 1
            while tiles * split < cfg["programs_per_sm"] * _sms(x.device) and d_in >= 2 * split * BLOCK_K:
                split *= 2
        split, k_split = _split_k(d_in, BLOCK_K, split)
        if split > 1:      # the splits add into a zeroed fp32 buffer, cast into v at the end
            out = torch.zeros(v3.shape, dtype=torch.float32, device=v3.device)
        so0, som, so1 = out.stride()
        grid = (triton.cdiv(T, BLOCK_M), triton.cdiv(R, BLOCK_R) * split, M)
        _shrink_grouped_kernel[grid](x, x.stride(0), x.stride(1), flat, rows, rs, meta3, sm0, sm1, smm,
                                     batch.token_slot, out, so0, so1, som, T, d_in, R, k_split,
                                     ALIGN=align, QUANT=quant, IEEE=x.dtype == torch.float32, SPLIT_K=split,
                                     BLOCK_M=BLOCK_M, BLOCK_R=BLOCK_R,
                                     BLOCK_K=BLOCK_K, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    elif batch.max_seg_len <= 1:
        cfg = _decode_tiles("shrink", quant, T)
        BLOCK_R = cfg["BLOCK_R"]
        BLOCK_K = min(cfg["BLOCK_K"], _p2(d_in))
        # past what plan codes hold, the full grid
        plan = bool(cfg.get("COMPACT", False)) and _plan_fits(T, R, BLOCK_R)
        if plan:       # one program per work item of the step's plan, in a grid of the most there can be
            items, n = _decode_plan(batch, meta3, BLOCK_R, R)
            grid, first = (items.shape[0], 1, 1), False
        else:
            items, n = batch.token_slot, batch.token_slot     # unused
            grid, first = _decode_grid(cfg, triton.cdiv(R, BLOCK_R), T, M)
        fp16_sums = x.dtype == torch.float16 and d_in <= FP16_SUM_STEPS * BLOCK_K
        _shrink_decode_kernel[grid](x, x.stride(0), x.stride(1), flat, rows, rs, meta3, sm0, sm1, smm,
                                    batch.token_slot, items, n, v3, sv0, sv1, svm, d_in, R,
                                    ALIGN=align, QUANT=quant, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K,
                                    PIPE=cfg.get("PIPE", 1), TILE_FIRST=first, PLAN=plan, R_P2=_p2(R),
                                    num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 3),
                                    DQ=_ptx_dq(cfg, quant, x.device, fp16_sums),
                                    **_pdl_args(cfg, x.device))
    else:
        cfg = TUNE["shrink_seg"]
        BLOCK_N = min(cfg.get("BLOCK_N") or 128, max(16, _p2(R)))
        n_tiles = triton.cdiv(R, BLOCK_N)
        G = batch.seg_slot.numel()
        BLOCK_K = cfg["BLOCK_K"] if x.dtype != torch.float32 else 32
        BLOCK_M, split = _shrink_seg_tiles(cfg, batch, M * n_tiles, d_in, _sms(x.device))
        m_tiles = triton.cdiv(batch.max_seg_len, BLOCK_M)
        split, k_split = _split_k(d_in, BLOCK_K, split)
        grid = (G, m_tiles, M * n_tiles * split)
        # split-K partials (uninitialised: each split of a tile with work writes all of its part)
        # and the tiles' counters
        part = torch.empty((split, *v3.shape), dtype=torch.float32, device=x.device) if split > 1 else v3
        cnt = _tile_counters(x.device, G * m_tiles * M * n_tiles) if split > 1 else batch.seg_indptr
        _shrink_seg_kernel[grid](x, x.stride(0), x.stride(1), flat, rows, rs, meta3, sm0, sm1, smm,
                                 batch.seg_indptr, batch.seg_slot, v3, sv0, sv1, svm, d_in, R, k_split, n_tiles,
                                 part, part.stride(0), cnt,
                                 ALIGN=align, QUANT=quant, IEEE=x.dtype == torch.float32, SPLIT_K=split,
                                 BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                                 I4_SPLIT=quant == 2 and BLOCK_K >= 32 and bool(cfg.get("I4_SPLIT", False)),
                                 num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if out is not v3:       # split-K partial sums: one cast into v
        v3.copy_(out)
    return v


def _rows_expand(quant: int, T: int, max_rank: int) -> bool:
    """Whether a decode expand runs by row chunks (_expand_rows_kernel): int8 rows with the expand
    family's key ROWS, or int4 rows (the only decode expand that reads them), and a plan whose
    codes hold the batch."""
    fits = _plan_fits(T, max_rank, _rows_tiles(quant)["BLOCK_R"])
    if quant == 2:
        assert fits, f"int4 rows: a decode batch of {T} tokens at rank {max_rank} is past the expand plan's codes"
        return True
    return bool(quant) and bool(_decode_tiles("expand", quant, T).get("ROWS", False)) and fits


def lora_expand(y: torch.Tensor, v: torch.Tensor, flat: torch.Tensor, rows: torch.Tensor,
                meta: torch.Tensor, scaling: torch.Tensor, batch: LoraBatch,
                widths: tuple[int, ...] | None = None, row_scale: torch.Tensor | None = None) -> None:
    """y[t] += scaling[slot] * v[t, :r] @ B_slot(t)^T, in place. y: [T, d_out] (may be a view).

    Several modules in one launch: meta [slots, M, 4], v [T, M, R] from lora_shrink, and
    ``widths`` the M output widths; module m adds into columns sum(widths[:m]) + [0, widths[m]).
    """
    T, d_out = y.shape
    if T == 0 or batch.max_rank == 0 or d_out == 0:
        return
    meta3 = _modules(meta)
    M = meta3.shape[1]
    v3 = v if v.dim() == 3 else v.unsqueeze(1)
    widths, W0, W1, W2 = _module_widths(widths, d_out, M)
    w_max = max(widths)
    quant, rs = _quant(flat, rows, row_scale)
    align = _row_align(flat)
    sm0, smm, sm1 = meta3.stride()
    sv0, svm, sv1 = v3.stride()
    if batch.max_seg_len <= 1 and batch.grouped:
        cfg = TUNE["expand_grouped"]
        BLOCK_M = cfg["BLOCK_M"]
        BLOCK_N = min(cfg["BLOCK_N"], max(16, _p2(w_max)))
        BLOCK_K = min(64, max(16, _p2(batch.max_rank)))
        grid = (triton.cdiv(T, BLOCK_M), triton.cdiv(w_max, BLOCK_N), M)
        # int8 rows: no software pipelining. Triton 3.6 lowers this kernel's int8 tile to 1-byte
        # async copies, which fail to compile (H100); the rank loop is one iteration at rank <= 64,
        # so there was nothing to pipeline anyway.
        _expand_grouped_kernel[grid](y, y.stride(0), y.stride(1), v3, sv0, sv1, svm, flat, rows, rs,
                                     meta3, sm0, sm1, smm, scaling, batch.token_slot, T, W0, W1, W2,
                                     ALIGN=align, QUANT=quant, IEEE=y.dtype == torch.float32, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                                     BLOCK_K=BLOCK_K, num_warps=cfg["num_warps"],
                                     num_stages=1 if quant else cfg["num_stages"])
    elif batch.max_seg_len <= 1 and _rows_expand(quant, T, batch.max_rank):
        cfg = _rows_tiles(quant)
        BLOCK_R, split = cfg["BLOCK_R"], cfg.get("SPLIT", 1)
        items, n = _decode_plan(batch, meta3, BLOCK_R, batch.max_rank, "expand")
        _expand_rows_kernel[(items.shape[0], split)](y, y.stride(0), y.stride(1), v3, sv0, sv1, svm, flat, rows, rs,
                                                     meta3, sm0, sm1, smm, scaling, items, n, W0, W1, W2,
                                                     ALIGN=align, BLOCK_R=BLOCK_R,
                                                     BLOCK_N=min(cfg["BLOCK_N"], _p2(w_max)), SPLIT=split,
                                                     PIPE=cfg.get("PIPE", 1), num_warps=cfg["num_warps"],
                                                     num_stages=cfg.get("num_stages", 3),
                                                     DQ=_ptx_dq(cfg, quant, y.device), G4=bool(cfg.get("G4", False)),
                                                     I4=quant == 2, **_pdl_args(cfg, y.device))
    elif batch.max_seg_len <= 1:
        cfg = _decode_tiles("expand", quant, T)
        BLOCK_N = min(cfg["BLOCK_N"], _p2(w_max))
        BLOCK_R = cfg["BLOCK_R"]
        grid, first = _decode_grid(cfg, triton.cdiv(w_max, BLOCK_N), T, M)
        rclass = bool(cfg.get("RCLASS", False))
        # BIAS: int8 rows as biased fp32, summed per thread (_expand_chunk_biased); TPR is how many
        # threads share a column in the one-warp tile (16-byte loads): any value is correct, that
        # one moves no data
        bias = bool(cfg.get("BIAS", False)) and quant and rclass
        tpr = min(max(1, BLOCK_R // 4), max(1, 512 * cfg["num_warps"] // BLOCK_N))
        _expand_decode_kernel[grid](y, y.stride(0), y.stride(1), v3, sv0, sv1, svm, flat, rows, rs,
                                    meta3, sm0, sm1, smm, scaling, batch.token_slot, W0, W1, W2,
                                    ALIGN=align, QUANT=quant, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N,
                                    PIPE=cfg.get("PIPE", 1), TILE_FIRST=first, RCLASS=rclass, BIAS=bias, TPR=tpr,
                                    num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 3),
                                    DQ=_ptx_dq(cfg, quant, y.device), **_pdl_args(cfg, y.device))
    else:
        cfg = TUNE["expand_seg"]
        BLOCK_N = min(cfg["BLOCK_N"], max(16, _p2(w_max)))
        n_tiles = triton.cdiv(w_max, BLOCK_N)
        BLOCK_M = cfg["BLOCK_M"] or _seg_block_m(batch, M * n_tiles)
        BLOCK_K = min(cfg.get("BLOCK_K", 64), max(16, _p2(batch.max_rank)))
        G = batch.seg_slot.numel()
        m_tiles = triton.cdiv(batch.max_seg_len, BLOCK_M)
        # short prompts: narrower column tiles until the grid covers half the SMs
        while BLOCK_N > 64 and G * m_tiles * M * n_tiles * 2 < _sms(y.device):
            BLOCK_N //= 2
            n_tiles = triton.cdiv(w_max, BLOCK_N)
        grid = (G, m_tiles, M * n_tiles)
        _expand_seg_kernel[grid](y, y.stride(0), y.stride(1), v3, sv0, sv1, svm, flat, rows, rs,
                                 meta3, sm0, sm1, smm, scaling, batch.seg_indptr, batch.seg_slot,
                                 W0, W1, W2, n_tiles, ALIGN=align, QUANT=quant, IEEE=y.dtype == torch.float32,
                                 BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                                 I4_SPLIT=quant == 2 and BLOCK_N >= 32 and bool(cfg.get("I4_SPLIT", False)),
                                 num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _fused_tiles(quant: int, batch: LoraBatch, T: int) -> dict | None:
    """The TUNE entry of the fused decode LoRA where it applies to this launch, else None: quantized
    rows (its expand is the row-chunk one, _add_rows), the decode schedule by token, FUSED on, at least
    MIN_T tokens, and a plan whose codes hold the batch."""
    if not quant or batch.max_seg_len > 1 or batch.grouped or batch.max_rank == 0 or T == 0:
        return None
    cfg = TUNE["fused_decode_int4" if quant == 2 else "fused_decode_int8"]
    fused = cfg.get("FUSED", False) and T >= cfg.get("MIN_T", 1) and _plan_fits(T, batch.max_rank, cfg["BLOCK_R"])
    return cfg if fused else None


def _fused_constexprs(cfg: dict, quant: int, modules: int, d_in: int, width: int, x_dtype: torch.dtype,
                      device: torch.device) -> dict:
    """The fused kernel's tiles for a launch of `modules` modules (MULTI's where several) at d_in and
    the widest module `width`, with x in x_dtype on device: what lora_apply launches with (besides
    ALIGN, QUANT, PDL) and benchmarks/kernel_registers.py compiles."""
    if modules > 1:     # MULTI: the tiles of launches of several modules (q/k/v) where they differ
        cfg = {**cfg, **cfg.get("MULTI", {})}
    block_k = min(cfg["BLOCK_K"], _p2(d_in))
    sub = max(1, min(int(cfg.get("SUB", 1)), block_k // 16))     # SUB: see _shrink_rows
    fp16_sums = x_dtype == torch.float16 and d_in <= FP16_SUM_STEPS * (block_k // sub)
    return dict(BLOCK_R=cfg["BLOCK_R"], BLOCK_K=block_k, BLOCK_N=min(cfg["BLOCK_N"], _p2(width)),
                PIPE=cfg.get("PIPE", 1), PIPE_E=cfg.get("PIPE_E", 1), DQ=_ptx_dq(cfg, quant, device, fp16_sums),
                DQ_E=_ptx_dq(cfg, quant, device), G4=bool(cfg.get("G4", False)),
                PREFETCH=int(cfg.get("PREFETCH", 0)) if device.type == "cuda" else 0, G8=bool(cfg.get("G8", False)),
                SUB=sub, num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 3))


def lora_apply(y: torch.Tensor, x: torch.Tensor, flat: torch.Tensor, rows: torch.Tensor, meta: torch.Tensor,
               scaling: torch.Tensor, batch: LoraBatch, widths: tuple[int, ...] | None = None,
               row_scale: torch.Tensor | None = None) -> None:
    """y[t] += scaling[slot] * (x[t] @ A_slot(t)^T) @ B_slot(t)^T, in place: lora_shrink then
    lora_expand (same arguments), or one launch of _fused_decode_kernel where _fused_tiles allows
    (its v stays in fp32 where the split kernels round it to x's dtype)."""
    T, d_out = y.shape
    quant, rs = _quant(flat, rows, row_scale)
    cfg = _fused_tiles(quant, batch, T)
    if cfg is None or d_out == 0:
        v = lora_shrink(x, flat, rows, meta, batch, row_scale)
        lora_expand(y, v, flat, rows, meta, scaling, batch, widths, row_scale)
        return
    meta3 = _modules(meta)
    M = meta3.shape[1]
    widths, W0, W1, W2 = _module_widths(widths, d_out, M)
    d_in = x.shape[1]
    sm0, smm, sm1 = meta3.stride()
    tiles = _fused_constexprs(cfg, quant, M, d_in, max(widths), x.dtype, x.device)
    items, n = _decode_plan(batch, meta3, tiles["BLOCK_R"], batch.max_rank, "expand")
    _fused_decode_kernel[(items.shape[0],)](x, x.stride(0), x.stride(1), y, y.stride(0), y.stride(1), flat, rows, rs,
                                            meta3, sm0, sm1, smm, scaling, items, n, d_in, W0, W1, W2,
                                            ALIGN=_row_align(flat), QUANT=quant, **tiles, **_pdl_args(cfg, x.device))
