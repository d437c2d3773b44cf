"""Registers per thread and resident warps per SM of the decode LoRA kernels, for a GPU target,
without a GPU: each tile variant is compiled to a cubin, and ``cuobjdump -res-usage`` (shipped with
Triton) reads its register count.

It also reports each variant's shared memory and whether its loop's loads became asynchronous
copies (PIPE). Halving the registers did not speed the decode kernels up on the H100
(benchmarks/results/tune-sweep-2026-11-25j-h100), but a tile whose registers or shared memory
leave few warps per SM still shows it here before it costs device time.

    python benchmarks/kernel_registers.py                     # sm_90, the TUNE tiles and a few more
    python benchmarks/kernel_registers.py --arch 90 --tiles shrink:8x256w1,expand:16x256w2
    # the fused decode kernel (lora_apply) of each variant in a bench_lora_decode --variants file, q/k/v and o
    # at Llama-7B widths; with the device's Triton (3.6) these matched Nsight Compute (lora-prefetch-2026-12-05)
    python benchmarks/kernel_registers.py --fused benchmarks/results/lora-prefetch-2026-12-05/variants-F-int4.json \\
        --adapter-dtype int4
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import kernels.triton_lora as K  # noqa: E402

REGS_PER_SM, MAX_WARPS, MAX_CTAS = 65536, 64, 32      # sm_80 / sm_90
SMEM_PER_SM = 228 * 1024                               # sm_90
PTR_TYPES = {"flat_ptr": None, "rows_ptr": "*i64", "meta_ptr": "*i32", "slot_ptr": "*i32", "rs_ptr": "*fp32",
             "scale_ptr": "*fp32", "items_ptr": "*i32", "n_ptr": "*i32"}
# integer arguments the launcher specializes as multiples of 16 at Llama shapes (strides, d_in, widths)
DIV16 = {"sx0", "sv0", "sy0", "sm0", "d_in", "W0", "W1", "W2"}
DEFAULT_TILES = ("shrink:8x256w1,shrink:8x256w1p3,shrink:8x1024w4,shrink:8x1024w4p3,shrink:16x1024w4,"
                 "expand:16x64w1,expand:16x64w1p3,expand:16x256w2,expand:32x128w2")


def compile_tile(kind: str, rows_dtype: str, block_r: int, block_x: int, warps: int, arch: int, pipe: int = 1):
    """The compiled kernel (triton's CompiledKernel: .asm, .metadata)."""
    fn = K._shrink_decode_kernel if kind == "shrink" else K._expand_decode_kernel
    quant = rows_dtype == "int8"
    const = dict(ALIGN=16 if quant else 8, QUANT=quant, BLOCK_R=block_r, PIPE=pipe, TILE_FIRST=False, PDL=False, DQ=0,
                 **({"PLAN": False, "R_P2": 64} if kind == "shrink" else {"RCLASS": False}),
                 **({"BLOCK_K": block_x, "sx1": 1, "sv1": 1} if kind == "shrink" else {"BLOCK_N": block_x, "sy1": 1, "sv1": 1}))
    names = fn.arg_names
    sig = {}
    for n in names:
        if n in const:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = PTR_TYPES.get(n) or ("*i8" if quant and n == "flat_ptr" else "*fp16")
        else:
            sig[n] = "i32"
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if sig[n].startswith("*") or n in DIV16}
    return triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=warps, num_stages=3))


def compile_fused(cfg: dict, quant: int, multi: bool, arch: int, d: int = 4096):
    """The fused decode kernel as lora_apply launches it with TUNE entry cfg for one module (o) or
    several (q/k/v, MULTI's tiles), fp16 activations on a GPU and d-wide modules."""
    tiles = K._fused_constexprs(cfg, quant, 3 if multi else 1, d, d, torch.float16, torch.device("cuda"))
    warps, stages = tiles.pop("num_warps"), tiles.pop("num_stages")
    const = dict(ALIGN=16, QUANT=quant, PDL=bool(cfg.get("PDL", False)), **tiles, sx1=1, sy1=1, sm1=1)
    fn = K._fused_decode_kernel
    names = fn.arg_names
    ptrs = {**PTR_TYPES, "flat_ptr": "*u8" if quant == 2 else "*i8"}
    sig = {}
    for n in names:
        if n in const:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = ptrs.get(n, "*fp16")
        else:
            sig[n] = "i32"
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if sig[n].startswith("*") or n in DIV16}
    return triton.compile(ASTSource(fn, sig, {(names.index(k),): v for k, v in const.items()}, attrs),
                          target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))


def fused_table(path: str, adapter_dtype: str, arch: int) -> None:
    """Registers, shared memory and programs an SM of the fused kernel, q/k/v and o, for each
    variant in a bench_lora_decode --variants file."""
    family = f"fused_decode_{adapter_dtype}"
    print(f"{'variant':<16} {'group':<6} {'registers':>9} {'smem B':>7} {'programs/SM':>11} {'SASS':>6}")
    with open(path) as f:
        variants = json.load(f)
    for name, spec in variants.items():
        cfg = {**K.TUNE[family], **spec.get("lora", {}).get(family, {})}
        for multi in (True, False):
            c = compile_fused(cfg, 2 if adapter_dtype == "int4" else 1, multi, arch)
            regs, smem, w = registers(c.asm["cubin"]), c.metadata.shared, c.metadata.num_warps
            print(f"{name:<16} {'q/k/v' if multi else 'o':<6} {regs:>9} {smem:>7} {warps_per_sm(regs, w, smem) // w:>11} "
                  f"{sass_instructions(c.asm['cubin']):>6}", flush=True)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    tool = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), flag, f.name], capture_output=True, text=True, check=True).stdout


def registers(cubin: bytes) -> int:
    return int(re.search(r"REG:(\d+)", _cuobjdump(cubin, "-res-usage")).group(1))


def sass_instructions(cubin: bytes) -> int:
    """The kernel's SASS instructions (each line `/*addr*/ OP ... ;`)."""
    return sum(1 for line in _cuobjdump(cubin, "-sass").splitlines() if line.strip().startswith("/*") and ";" in line)


def warps_per_sm(regs: int, warps: int, smem: int = 0) -> int:
    per_warp = -(-max(regs, 24) * 32 // 256) * 256      # registers are allocated per warp in 256s
    ctas = min(MAX_CTAS, MAX_WARPS // warps, REGS_PER_SM // (per_warp * warps))
    if smem:
        ctas = min(ctas, SMEM_PER_SM // (smem + 1024))     # the driver reserves 1 KB per CTA
    return ctas * warps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--tiles", default=DEFAULT_TILES,
                    help="kind:RxKwW[pP],... (K is BLOCK_K or BLOCK_N, P the PIPE loop stages)")
    ap.add_argument("--fused", default="", help="a bench_lora_decode --variants file: the fused kernel of each")
    ap.add_argument("--adapter-dtype", default="int4", choices=["int4", "int8"], help="with --fused")
    args = ap.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if args.fused:
        fused_table(args.fused, args.adapter_dtype, args.arch)
        return
    print(f"{'kernel':<8} {'rows':<5} {'tile':<12} {'registers':>9} {'smem B':>7} {'cp.async':>8} {'warps/SM':>9}")
    for spec in args.tiles.split(","):
        kind, tile = spec.split(":")
        m = re.fullmatch(r"(\d+)x(\d+)w(\d+)(?:p(\d+))?", tile)
        r, x, w, pipe = int(m[1]), int(m[2]), int(m[3]), int(m[4] or 1)
        for rows_dtype in ("fp16", "int8"):
            c = compile_tile(kind, rows_dtype, r, x, w, args.arch, pipe)
            regs, smem = registers(c.asm["cubin"]), c.metadata.shared
            copies = len(re.findall(r"cp\.async\.c[ag]", c.asm["ptx"]))
            print(f"{kind:<8} {rows_dtype:<5} {tile:<12} {regs:>9} {smem:>7} {copies:>8} {warps_per_sm(regs, w, smem):>9}",
                  flush=True)


if __name__ == "__main__":
    main()
