"""Kernels: Triton implementations and their pure-torch references, behind one interface.

``get_ops(device)`` returns a namespace with lora_shrink, lora_expand, lora_apply (the two in one call), write_kv,
paged_attention, rms_norm, add_rms_norm, silu_mul, apply_rope, linear, and the fused
silu_mul_linear and rope_write_kv. On a CPU it is the reference; on CUDA the Triton
kernels wherever they exist (LORASERVE_KERNELS=reference forces the references).
"""
from __future__ import annotations

import os
import types

from kernels import reference


def get_ops(device) -> types.SimpleNamespace:
    ops = {name: getattr(reference, name) for name in
           ("lora_shrink", "lora_expand", "lora_apply", "write_kv", "paged_attention", "rms_norm", "add_rms_norm",
            "silu_mul", "apply_rope", "linear", "silu_mul_linear", "rope_write_kv")}
    want = os.environ.get("LORASERVE_KERNELS", "auto")
    if str(device).startswith("cuda") and want != "reference":
        try:
            from kernels import triton_ops
            ops.update(triton_ops.OPS)
        except ImportError:
            pass
    return types.SimpleNamespace(**ops)
