"""Deterministic synthetic adapters (S-LoRA's dummy weights) for benchmarks.

A SyntheticSpec (rank, target modules, seed, alpha) plus the base model's dims fully determine
a PEFT adapter: adapter_config.json and adapter_model.safetensors, byte for byte. Nothing is
stored: the store writes the safetensors stream on the fly, one tensor at a time, so a fetch
never holds the whole file. A ~ N(0, 1/in_features) and B ~ N(0, (0.02)^2 / r) in float16, so
the LoRA delta s * B A x stays around 0.02 * s per element for unit-scale activations. Values
are seeded slices of one fixed noise tape (see _noise_tape), which keeps generation at memory speed.
"""
from __future__ import annotations

import hashlib
import json
import struct
from typing import Iterator

from server.config import TARGET_MODULES

from .validate import BaseDims, SyntheticParams

__all__ = ["tensor_layout", "synthetic_config", "synthetic_weight_chunks", "synthetic_weights",
           "synthetic_adapter", "synthetic_size", "B_STD"]

B_STD = 0.02
_MLP = {"gate_proj", "up_proj", "down_proj"}


def _tensor_name(layer: int, module: str, ab: str) -> str:
    block = "mlp" if module in _MLP else "self_attn"
    return f"base_model.model.model.layers.{layer}.{block}.{module}.lora_{ab}.weight"


def tensor_layout(spec: SyntheticParams, dims: BaseDims) -> list[tuple[str, int, str, str, tuple[int, int]]]:
    """(name, layer, module, 'A'|'B', shape) in file order: layer-major, TARGET_MODULES order, A then B."""
    out = []
    mods = sorted(spec.target_modules, key=TARGET_MODULES.index)
    for layer in range(dims.num_layers):
        for m in mods:
            d_in, d_out = dims.module_dims(m)
            out.append((_tensor_name(layer, m, "A"), layer, m, "A", (spec.rank, d_in)))
            out.append((_tensor_name(layer, m, "B"), layer, m, "B", (d_out, spec.rank)))
    return out


def _header(spec: SyntheticParams, dims: BaseDims) -> tuple[bytes, list]:
    layout = tensor_layout(spec, dims)
    meta: dict = {"__metadata__": {"format": "pt", "loraserve_synthetic": spec.to_json()}}
    off = 0
    for name, _, _, _, shape in layout:
        n = shape[0] * shape[1] * 2
        meta[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hdr = json.dumps(meta, separators=(",", ":")).encode()
    hdr += b" " * (-len(hdr) % 8)
    return struct.pack("<Q", len(hdr)) + hdr, layout


def synthetic_size(spec: SyntheticParams, dims: BaseDims) -> int:
    """Exact byte size of adapter_model.safetensors, without generating it."""
    head, layout = _header(spec, dims)
    return len(head) + sum(s[0] * s[1] * 2 for *_, s in layout)


def synthetic_config(spec: SyntheticParams, base_model: str = "") -> bytes:
    return json.dumps({
        "peft_type": "LORA", "r": spec.rank, "lora_alpha": spec.alpha,
        "target_modules": list(spec.target_modules), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model, "inference_mode": True,
    }, sort_keys=True).encode()


def _seed(spec: SyntheticParams, layer: int, module: str, ab: str) -> int:
    h = hashlib.blake2b(f"{spec.seed}:{layer}:{module}:{ab}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


_TAPE_LEN = 1 << 24          # 16M float16 values (32 MiB): longer than any one LoRA tensor
_tape = None


def _noise_tape():
    """A fixed N(0, 1) float16 tape, drawn once per process. Tensors are seeded slices of it:
    drawing every element afresh ran at ~300 MB/s per core, and S-LoRA's n = 2000 (~126 GB of
    weights) would then spend minutes in the generator instead of in the system under test."""
    global _tape
    if _tape is None:
        import torch

        _tape = torch.randn(_TAPE_LEN, dtype=torch.float16, generator=torch.Generator().manual_seed(20231103))
    return _tape


def synthetic_weight_chunks(spec: SyntheticParams, dims: BaseDims) -> Iterator[bytes | memoryview]:
    """adapter_model.safetensors as a stream: the header (bytes), then one buffer per tensor.

    Each tensor is a slice of the noise tape at an offset drawn from (seed, layer, module, A/B),
    scaled to its std; so weights are random, non-zero, distinct per adapter and tensor, and
    reproducible byte for byte."""
    tape = _noise_tape()
    head, layout = _header(spec, dims)
    yield head
    for _, layer, module, ab, shape in layout:
        n = shape[0] * shape[1]
        if n > _TAPE_LEN:
            raise ValueError(f"synthetic tensor of {n} values is longer than the noise tape")
        off = _seed(spec, layer, module, ab) % (_TAPE_LEN - n + 1)
        std = (1.0 / shape[1]) ** 0.5 if ab == "A" else B_STD / spec.rank ** 0.5
        t = tape[off:off + n] * std
        yield memoryview(t.numpy()).cast("B")  # no copy; consumers slice or join it


def synthetic_weights(spec: SyntheticParams, dims: BaseDims) -> bytes:
    return b"".join(synthetic_weight_chunks(spec, dims))


def synthetic_adapter(spec: SyntheticParams, dims: BaseDims, base_model: str = "") -> tuple[bytes, bytes]:
    """(adapter_config.json bytes, adapter_model.safetensors bytes)."""
    return synthetic_config(spec, base_model), synthetic_weights(spec, dims)
