"""PEFT LoRA adapters: parse and validate adapter_config.json + adapter_model.safetensors.

Used by the engine (local --adapter folders, weights fetched from the store) and by the adapter
store's validation, so both reject the same things with the same messages. Pickled weights
(.bin/.pt) are never read.
"""
from __future__ import annotations

import json
import math
import pathlib
import re
from dataclasses import dataclass, field

import torch

from server.config import TARGET_MODULES, ModelConfig

MAX_RANK = 256
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_NAME = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")
_FLOAT_DTYPES = {torch.float16, torch.bfloat16, torch.float32}
# (integer view, the bits below the sign, the smallest magnitude bits of Inf: Inf and NaN are
# every pattern from it up)
_INF_BITS = {torch.float16: (torch.int16, 0x7FFF, 0x7C00), torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80),
             torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000)}


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in a float16/bfloat16/float32 tensor. Reads the bits as integers: the
    largest magnitude pattern is below Inf's exactly when every value is finite. On a CPU core
    this ran 15x faster than torch.isfinite(t).all() on float16 (8 vs 118 ms for a rank-64
    Llama-7B adapter), which every adapter fetch and registration pays."""
    if t.numel() == 0:
        return True
    int_dtype, magnitude, inf = _INF_BITS[t.dtype]
    return int((t.contiguous().view(int_dtype) & magnitude).amax()) < inf


class AdapterError(ValueError):
    """An adapter that cannot be served; the message names the field to fix."""


@dataclass
class LoraWeights:
    adapter_id: str
    rank: int
    alpha: float
    scaling: float
    target_modules: list[str]
    use_rslora: bool
    # (layer, module) -> (A [r, in_features], B [out_features, r])
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)

    @property
    def max_rank(self) -> int:
        """The widest v any matrix needs: A's rows and B's columns (they differ under TP)."""
        return max((max(a.shape[0], b.shape[1]) for a, b in self.weights.values()), default=0)

    def matrices(self):
        """(layer, module), (A, B) in layer-major, TARGET_MODULES order."""
        return sorted(self.weights.items(), key=lambda kv: (kv[0][0], TARGET_MODULES.index(kv[0][1])))

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


def parse_config(raw: bytes | str | dict) -> dict:
    """Validate adapter_config.json and return it normalized (target_modules as a sorted list)."""
    try:
        cfg = raw if isinstance(raw, dict) else json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{CONFIG_FILE} must hold a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"peft_type {cfg.get('peft_type')!r} is not supported: only LORA")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= MAX_RANK:
        raise AdapterError(f"r must be an integer in 1..{MAX_RANK}, got {r!r}")
    alpha = cfg.get("lora_alpha", r)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterError(f"lora_alpha must be a positive number, got {alpha!r}")
    if cfg.get("fan_in_fan_out"):
        raise AdapterError("fan_in_fan_out=true is not supported: Llama-family layers are nn.Linear")
    if cfg.get("use_dora"):
        raise AdapterError("use_dora=true is not supported")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"bias={cfg.get('bias')!r} is not supported: only 'none'")
    if cfg.get("modules_to_save"):
        raise AdapterError("modules_to_save is not supported: the adapter may only hold LoRA A/B matrices")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise AdapterError("rank_pattern/alpha_pattern are not supported: use one r and lora_alpha")
    tm = cfg.get("target_modules")
    if isinstance(tm, str):
        tm = [m for m in TARGET_MODULES if re.fullmatch(tm, m) or tm == m]
    if not isinstance(tm, list) or not tm or not all(isinstance(m, str) for m in tm):
        raise AdapterError(f"target_modules must be a non-empty list of module names, got {cfg.get('target_modules')!r}")
    bad = [m for m in tm if m.split(".")[-1] not in TARGET_MODULES]
    if bad:
        raise AdapterError(f"target_modules {bad} are not supported; supported: {list(TARGET_MODULES)}")
    out = dict(cfg)
    out["r"], out["lora_alpha"] = r, float(alpha)
    out["target_modules"] = sorted({m.split(".")[-1] for m in tm}, key=TARGET_MODULES.index)
    out["use_rslora"] = bool(cfg.get("use_rslora", False))
    return out


def load_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """Read safetensors bytes (never a pickle)."""
    from safetensors.torch import load

    if data[:2] in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
        raise AdapterError(f"{WEIGHTS_FILE} looks like a pickle/zip (torch.save): only safetensors are accepted")
    try:
        return load(data)
    except Exception as e:  # safetensors raises its own error types
        raise AdapterError(f"{WEIGHTS_FILE} is not a valid safetensors file: {e}") from None


def build_weights(adapter_id: str, cfg: dict, tensors: dict[str, torch.Tensor],
                  model: ModelConfig, dtype: torch.dtype = torch.float32) -> LoraWeights:
    """Check every tensor against the base model's shapes and collect (A, B) per layer/module."""
    r = cfg["r"]
    layers = cfg.get("layers_to_transform")
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = _NAME.match(name)
        if not m:
            raise AdapterError(f"unexpected tensor {name!r}: expected "
                               f"base_model.model.model.layers.N.(self_attn|mlp).MODULE.lora_(A|B).weight")
        layer, module, ab = int(m.group(1)), m.group(3), m.group(4)
        if module not in cfg["target_modules"]:
            raise AdapterError(f"tensor {name!r} is for {module}, which is not in target_modules")
        if layer >= model.num_layers:
            raise AdapterError(f"tensor {name!r}: layer {layer} but the base model has {model.num_layers} layers")
        if t.dtype not in _FLOAT_DTYPES:
            raise AdapterError(f"tensor {name!r} has dtype {t.dtype}; expected float16, bfloat16 or float32")
        d_in, d_out = model.module_dims(module)
        want = (r, d_in) if ab == "A" else (d_out, r)
        if tuple(t.shape) != want:
            raise AdapterError(f"tensor {name!r} has shape {tuple(t.shape)}; expected {want} "
                               f"(r={r}, base model {module} is {d_in}->{d_out})")
        if not all_finite(t):
            raise AdapterError(f"tensor {name!r} holds NaN or Inf")
        found.setdefault((layer, module), {})[ab] = t
    if not found:
        raise AdapterError(f"{WEIGHTS_FILE} holds no LoRA tensors")
    weights = {}
    for (layer, module), ab in found.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"layer {layer} {module} has lora_{''.join(ab)} but not both A and B")
        weights[(layer, module)] = (ab["A"].to(dtype).contiguous(), ab["B"].to(dtype).contiguous())
    expected_layers = set(layers) if isinstance(layers, list) else set(range(model.num_layers))
    missing = [(l, m) for l in expected_layers for m in cfg["target_modules"] if (l, m) not in weights]
    if missing:
        raise AdapterError(f"missing LoRA weights for {len(missing)} target(s), first: layer {missing[0][0]} {missing[0][1]}")
    alpha = cfg["lora_alpha"]
    scaling = alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r
    return LoraWeights(adapter_id, r, alpha, scaling, list(cfg["target_modules"]), cfg["use_rslora"], weights)


def parse_adapter(adapter_id: str, config_bytes: bytes, weight_bytes: bytes, model: ModelConfig,
                  dtype: torch.dtype = torch.float32) -> LoraWeights:
    return build_weights(adapter_id, parse_config(config_bytes), load_tensors(weight_bytes), model, dtype)


def load_peft_dir(adapter_id: str, path: str | pathlib.Path, model: ModelConfig,
                  dtype: torch.dtype = torch.float32) -> LoraWeights:
    """Load a local PEFT folder (adapter_config.json + adapter_model.safetensors)."""
    path = pathlib.Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise AdapterError(f"{path} has no {CONFIG_FILE}")
    if not (path / WEIGHTS_FILE).is_file():
        pickled = [p.name for p in path.glob("adapter_model.*") if p.suffix in (".bin", ".pt", ".pth")]
        hint = f" ({pickled[0]} is a pickle and is refused; convert it to safetensors)" if pickled else ""
        raise AdapterError(f"{path} has no {WEIGHTS_FILE}{hint}")
    return parse_adapter(adapter_id, (path / CONFIG_FILE).read_bytes(), (path / WEIGHTS_FILE).read_bytes(), model, dtype)
