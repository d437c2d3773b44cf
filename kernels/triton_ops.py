"""The Triton kernels behind kernels.get_ops on CUDA (imported only where triton is installed).

All of them were checked against kernels/reference.py on an H100 at Llama-7B shapes in fp16 and bf16
(tests/test_kernels.py, 2026-11-25); see benchmarks/KERNELS.md.
"""
from __future__ import annotations

from kernels.triton_attention import paged_attention, rope_write_kv, write_kv
from kernels.triton_gemv import linear, silu_mul_linear
from kernels.triton_lora import lora_apply, lora_expand, lora_shrink
from kernels.triton_norm_rope import add_rms_norm, apply_rope, rms_norm, silu_mul

OPS = {
    "lora_shrink": lora_shrink,
    "lora_expand": lora_expand,
    "lora_apply": lora_apply,
    "write_kv": write_kv,
    "paged_attention": paged_attention,
    "rms_norm": rms_norm,
    "apply_rope": apply_rope,
    "add_rms_norm": add_rms_norm,
    "silu_mul": silu_mul,
    "linear": linear,
    "silu_mul_linear": silu_mul_linear,
    "rope_write_kv": rope_write_kv,
}
