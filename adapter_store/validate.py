"""Validation of everything an upload carries, before any of it becomes visible.

Reuses server/lora.py (parse_config, load_tensors, build_weights) so that the store and the
engine accept and reject the same adapters with the same messages. Weights are only ever read
as safetensors; pickles are refused by name and by magic bytes, never unpickled.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field

from server.config import TARGET_MODULES
from server.lora import CONFIG_FILE, MAX_RANK, WEIGHTS_FILE, AdapterError, build_weights, load_tensors, parse_config

from .errors import InvalidArgument, ResourceExhausted

__all__ = ["ADAPTER_ID_RE", "Limits", "BaseDims", "ValidatedAdapter", "validate_adapter_id", "validate_base_model",
           "check_filename", "check_sha256", "precheck", "validate_adapter", "validate_synthetic", "SyntheticParams",
           "CONFIG_FILE", "WEIGHTS_FILE"]

ADAPTER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
BASE_MODEL_RE = re.compile(r"^[^\x00-\x20\x7f]{1,256}$")  # only ever part of Redis keys, never a path
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
DEFAULT_SYNTHETIC_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class Limits:
    max_rank: int = MAX_RANK                 # above: RESOURCE_EXHAUSTED (above MAX_RANK: INVALID_ARGUMENT)
    max_weights_bytes: int = 2 << 30         # adapter_model.safetensors
    max_config_bytes: int = 64 << 10         # adapter_config.json


class BaseDims:
    """The part of a ModelConfig that validation needs: layer count and per-module (in, out)."""

    def __init__(self, num_layers: int, modules: dict[str, tuple[int, int]], name: str = "model"):
        self.num_layers = int(num_layers)
        self.modules = {m: (int(d[0]), int(d[1])) for m, d in modules.items()}
        self.name = name

    @classmethod
    def from_dict(cls, d: dict, name: str = "model") -> "BaseDims":
        """From ModelConfig.dims_dict(): {"num_layers": N, "modules": {"q_proj": [in, out], ...}}."""
        try:
            n = d["num_layers"]
            mods = d["modules"]
            if not isinstance(n, int) or n < 1 or not isinstance(mods, dict) or not mods:
                raise ValueError
            out = {}
            for m, v in mods.items():
                if m not in TARGET_MODULES or len(v) != 2 or not all(isinstance(x, int) and x > 0 for x in v):
                    raise ValueError
                out[m] = (v[0], v[1])
        except (KeyError, TypeError, ValueError):
            raise InvalidArgument(f"base model dims must look like ModelConfig.dims_dict(), got {d!r}") from None
        return cls(n, out, name)

    def to_dict(self) -> dict:
        return {"num_layers": self.num_layers, "modules": {m: list(v) for m, v in self.modules.items()}}

    def module_dims(self, module: str) -> tuple[int, int]:
        try:
            return self.modules[module]
        except KeyError:
            raise AdapterError(f"target module {module} does not exist in base model {self.name}") from None


@dataclass
class ValidatedAdapter:
    rank: int
    alpha: float
    target_modules: list[str]
    use_rslora: bool
    size_bytes: int
    sha256: str
    config: dict = field(repr=False)


@dataclass(frozen=True)
class SyntheticParams:
    rank: int
    target_modules: tuple[str, ...]
    seed: int
    alpha: float

    def to_json(self) -> str:
        return json.dumps({"rank": self.rank, "target_modules": list(self.target_modules),
                           "seed": self.seed, "alpha": self.alpha}, sort_keys=True)

    @classmethod
    def from_json(cls, s: str | bytes) -> "SyntheticParams":
        d = json.loads(s)
        return cls(int(d["rank"]), tuple(d["target_modules"]), int(d["seed"]), float(d["alpha"]))


def validate_adapter_id(adapter_id: str, field_name: str = "adapter_id") -> str:
    if not isinstance(adapter_id, str) or not adapter_id:
        raise InvalidArgument(f"{field_name} is required")
    if not ADAPTER_ID_RE.match(adapter_id):
        raise InvalidArgument(f"{field_name} {adapter_id[:140]!r} is invalid: must match "
                              f"^[A-Za-z0-9][A-Za-z0-9._-]{{0,127}}$")
    return adapter_id


def validate_base_model(name: str) -> str:
    if not BASE_MODEL_RE.match(name or ""):
        raise InvalidArgument(f"base_model {name[:260]!r} is invalid: 1-256 characters, no spaces or control characters")
    return name


def check_filename(name: str) -> str:
    """The file a chunk belongs to: only adapter_config.json and adapter_model.safetensors."""
    if name in (CONFIG_FILE, WEIGHTS_FILE):
        return name
    base = name.rsplit("/", 1)[-1].lower()
    if base.endswith(_PICKLE_SUFFIXES):
        raise InvalidArgument(f"chunk.filename {name[:200]!r} is pickled weights (torch.save): refused, never "
                              f"unpickled; convert it to {WEIGHTS_FILE}")
    raise InvalidArgument(f"chunk.filename {name[:200]!r} is not accepted: only {CONFIG_FILE} and {WEIGHTS_FILE}")


def check_sha256(s: str) -> str:
    s = (s or "").strip().lower()
    if s and not _SHA_RE.match(s):
        raise InvalidArgument(f"header.sha256 must be 64 hex digits, got {s[:80]!r}")
    return s


def validate_adapter(adapter_id: str, config_bytes: bytes, weight_bytes: bytes, dims: BaseDims,
                     limits: Limits = Limits(), expected_sha256: str = "", digest: str | None = None) -> ValidatedAdapter:
    """Everything about an upload; raises InvalidArgument / ResourceExhausted naming the field.

    digest: the weights' sha256 when the caller already computed it (while streaming).
    """
    _check_present_and_sizes(config_bytes, weight_bytes, limits)
    digest = digest or hashlib.sha256(weight_bytes).hexdigest()
    expected = check_sha256(expected_sha256)
    if expected and expected != digest:
        raise InvalidArgument(f"header.sha256 mismatch: {WEIGHTS_FILE} has sha256 {digest}, header says {expected}")
    try:
        cfg = parse_config(config_bytes)
        if cfg["r"] > limits.max_rank:
            raise ResourceExhausted(f"r={cfg['r']} exceeds this store's rank limit {limits.max_rank}")
        tensors = load_tensors(weight_bytes)
        dtype = next(iter(tensors.values())).dtype if tensors else None
        import torch
        w = build_weights(adapter_id, cfg, tensors, dims, dtype or torch.float32)
    except AdapterError as e:
        raise InvalidArgument(str(e)) from None
    return ValidatedAdapter(rank=w.rank, alpha=float(w.alpha), target_modules=list(w.target_modules),
                            use_rslora=w.use_rslora, size_bytes=len(weight_bytes), sha256=digest, config=cfg)


def _check_present_and_sizes(config_bytes: bytes, weight_bytes: bytes, limits: Limits) -> None:
    if not config_bytes:
        raise InvalidArgument(f"{CONFIG_FILE} is missing: send it as chunk.filename={CONFIG_FILE}")
    if not weight_bytes:
        raise InvalidArgument(f"{WEIGHTS_FILE} is missing: send it as chunk.filename={WEIGHTS_FILE}")
    if len(config_bytes) > limits.max_config_bytes:
        raise ResourceExhausted(f"{CONFIG_FILE} is {len(config_bytes)} bytes; limit {limits.max_config_bytes}")
    if len(weight_bytes) > limits.max_weights_bytes:
        raise ResourceExhausted(f"{WEIGHTS_FILE} is {len(weight_bytes)} bytes; limit {limits.max_weights_bytes}")


def precheck(config_bytes: bytes, weight_bytes: bytes, limits: Limits = Limits()) -> None:
    """The cheap part of validate_adapter (sizes, the config, the safetensors header), so that a
    malformed upload is refused before anything is written; validate_adapter does the rest."""
    _check_present_and_sizes(config_bytes, weight_bytes, limits)
    try:
        cfg = parse_config(config_bytes)
    except AdapterError as e:
        raise InvalidArgument(str(e)) from None
    if cfg["r"] > limits.max_rank:
        raise ResourceExhausted(f"r={cfg['r']} exceeds this store's rank limit {limits.max_rank}")
    head = bytes(weight_bytes[:8])
    if head[:2] in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
        raise InvalidArgument(f"{WEIGHTS_FILE} looks like a pickle/zip (torch.save): only safetensors are accepted")
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if n < 2 or 8 + n > len(weight_bytes) or n > 100 << 20:
        raise InvalidArgument(f"{WEIGHTS_FILE} is not a valid safetensors file: bad header length")
    try:
        meta = json.loads(bytes(weight_bytes[8:8 + n]))
        if not isinstance(meta, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument(f"{WEIGHTS_FILE} is not a valid safetensors file: header is not a JSON object") from None


def validate_synthetic(rank: int, target_modules, seed: int, alpha: float, dims: BaseDims,
                       limits: Limits = Limits()) -> SyntheticParams:
    """A SyntheticSpec: rank, target modules (default q,k,v,o), seed, alpha (0: 2 * rank)."""
    if not isinstance(rank, int) or rank < 1 or rank > MAX_RANK:
        raise InvalidArgument(f"synthetic.rank must be in 1..{MAX_RANK}, got {rank!r}")
    if rank > limits.max_rank:
        raise ResourceExhausted(f"synthetic.rank={rank} exceeds this store's rank limit {limits.max_rank}")
    mods = list(target_modules) or list(DEFAULT_SYNTHETIC_TARGETS)
    bad = [m for m in mods if m not in TARGET_MODULES]
    if bad:
        raise InvalidArgument(f"synthetic.target_modules {bad} are not supported; supported: {list(TARGET_MODULES)}")
    missing = [m for m in mods if m not in dims.modules]
    if missing:
        raise InvalidArgument(f"synthetic.target_modules {missing} do not exist in base model {dims.name}")
    mods = sorted(set(mods), key=TARGET_MODULES.index)
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha < 0:
        raise InvalidArgument(f"synthetic.alpha must be a finite number >= 0, got {alpha!r}")
    if alpha == 0:
        alpha = 2.0 * rank
    if not 0 <= int(seed) < 2 ** 64:
        raise InvalidArgument(f"synthetic.seed out of range: {seed!r}")
    return SyntheticParams(rank, tuple(mods), int(seed), alpha)
