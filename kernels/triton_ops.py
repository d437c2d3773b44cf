"""The Triton kernels behind kernels.get_ops on CUDA (imported only where triton is installed)."""
from __future__ import annotations

from kernels.triton_attention import paged_attention, write_kv
from kernels.triton_lora import lora_expand, lora_shrink

OPS = {
    "lora_shrink": lora_shrink,
    "lora_expand": lora_expand,
    "write_kv": write_kv,
    "paged_attention": paged_attention,
}
