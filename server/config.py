"""Model configuration read from a Hugging Face config.json (Llama, Mistral, Qwen2 families)."""
from __future__ import annotations

import json
import math
import pathlib
from dataclasses import dataclass, field

# LoRA target modules the engine supports, in the order the pool's index tables use.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION = TARGET_MODULES[:4]       # the rest (gate/up/down) are the MLP's
SUPPORTED_ARCHS = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}
_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
# transformers' defaults where config.json leaves num_key_value_heads out (Llama: one per head)
_KV_HEADS_DEFAULT = {"MistralForCausalLM": 8}


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False      # Qwen2: bias on q, k and v
    sliding_window: int | None = None  # attention window (Mistral; Qwen2 with use_sliding_window)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = "LlamaForCausalLM"
    name: str = "model"
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_dims(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a target module's base weight."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_width), "k_proj": (h, self.kv_width), "v_proj": (h, self.kv_width),
            "o_proj": (self.q_width, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }[module]

    def dims_dict(self) -> dict:
        """What the adapter store needs to validate adapters against this base model."""
        return {"num_layers": self.num_layers,
                "modules": {m: list(self.module_dims(m)) for m in TARGET_MODULES}}

    @classmethod
    def from_dict(cls, cfg: dict, name: str = "model") -> "ModelConfig":
        """Refuses, naming the field, what this engine would compute differently from transformers."""
        archs = cfg.get("architectures")
        model_type = cfg.get("model_type", "llama")
        arch = archs[0] if archs else _BY_MODEL_TYPE.get(model_type)
        if arch not in SUPPORTED_ARCHS:
            what = f"architecture {arch!r}" if archs else f"model_type {model_type!r}"
            raise ValueError(f"unsupported {what}; supported: {sorted(SUPPORTED_ARCHS)}")
        missing = [k for k in _REQUIRED if k not in cfg]
        if missing:
            raise ValueError(f"config.json lacks {missing}: a {arch} config needs {list(_REQUIRED)}")
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):           # (transformers maps both to SiLU)
            raise ValueError(f"hidden_act {act!r} is not supported: the MLP is SwiGLU (silu)")
        if cfg.get("mlp_bias"):
            raise ValueError("mlp_bias=true is not supported: gate/up/down carry no bias here")
        if arch != "Qwen2ForCausalLM" and cfg.get("attention_bias"):
            raise ValueError(f"attention_bias=true is not supported for {arch} (its o_proj bias is not applied)")
        window = cfg.get("sliding_window") if arch == "MistralForCausalLM" or cfg.get("use_sliding_window") else None
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"], num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or _KV_HEADS_DEFAULT.get(arch, heads), head_dim=head_dim,
            vocab_size=cfg["vocab_size"], rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            rope_scaling=cfg.get("rope_scaling") or _rope_params_scaling(cfg),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=arch == "Qwen2ForCausalLM",      # Qwen2 always has q/k/v biases
            sliding_window=int(window) if window else None,
            bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids,
            architecture=arch, name=name, raw=cfg)

    @classmethod
    def from_dir(cls, path: str | pathlib.Path) -> "ModelConfig":
        path = pathlib.Path(path)
        return cls.from_dict(json.loads((path / "config.json").read_text()), name=path.name)


def _rope_params_scaling(cfg: dict) -> dict | None:
    # transformers >= 5 writes rope settings under "rope_parameters".
    params = cfg.get("rope_parameters")
    if params and params.get("rope_type", "default") != "default":
        return params
    return None


def rope_inv_freq(cfg: ModelConfig) -> "torch.Tensor":
    """RoPE inverse frequencies, with Llama-3 and linear scaling as transformers applies them."""
    import torch

    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "llama3":
        factor, lo, hi = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old = sc.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        lo_wav, hi_wav = old / lo, old / hi
        scaled = torch.where(wavelen > lo_wav, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= hi_wav) & (wavelen <= lo_wav)
        inv = torch.where(is_mid, mid, scaled)
    elif kind == "linear":
        inv = inv / sc["factor"]
    elif kind not in ("default", None):
        raise ValueError(f"unsupported rope_scaling type {kind!r}")
    return inv.float()
