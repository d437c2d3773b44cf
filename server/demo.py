"""A tiny Llama built deterministically, so `loraserve serve` works with no files and no network.

The weights are random (seed 0) and the tokenizer is byte-level with no merges: it serves
real requests through the real engine, but its text is noise. Pass --model for a real model.
"""
from __future__ import annotations

import json
import pathlib

import torch

DEMO_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
    "vocab_size": 99, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "tie_word_embeddings": False,
    "bos_token_id": 96, "eos_token_id": 97, "pad_token_id": 98, "torch_dtype": "float32",
}


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    # printable ASCII only (as byte-level symbols), so even a random model prints readable text
    byte_char = {b: c for b, c in zip(range(256), _bytes_to_unicode())}
    vocab = {byte_char[b]: i for i, b in enumerate(range(32, 127))}
    vocab["<unk>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<unk>", "<s>", "</s>", "<pad>"])
    assert tok.get_vocab_size() == DEMO_CONFIG["vocab_size"]
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 96)])
    return tok


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable-symbol map (the ByteLevel pre-tokenizer's alphabet)."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return [out[b] for b in range(256)]


def random_llama_state(cfg: dict, seed: int = 0, std: float = 0.05) -> dict[str, torch.Tensor]:
    """Random weights with Hugging Face Llama names for a config dict (tests use this too)."""
    g = torch.Generator().manual_seed(seed)
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    D = cfg.get("head_dim") or H // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * D, cfg["num_key_value_heads"] * D
    rnd = lambda *s: torch.randn(*s, generator=g) * std  # noqa: E731
    sd = {"model.embed_tokens.weight": rnd(V, H), "model.norm.weight": 1 + rnd(H)}
    for i in range(cfg["num_hidden_layers"]):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        sd.update({a + "q_proj.weight": rnd(q, H), a + "k_proj.weight": rnd(kv, H),
                   a + "v_proj.weight": rnd(kv, H), a + "o_proj.weight": rnd(H, q),
                   m + "gate_proj.weight": rnd(I, H), m + "up_proj.weight": rnd(I, H),
                   m + "down_proj.weight": rnd(H, I),
                   f"model.layers.{i}.input_layernorm.weight": 1 + rnd(H),
                   f"model.layers.{i}.post_attention_layernorm.weight": 1 + rnd(H)})
        if cfg.get("attention_bias"):
            sd.update({a + "q_proj.bias": rnd(q), a + "k_proj.bias": rnd(kv), a + "v_proj.bias": rnd(kv)})
    if not cfg.get("tie_word_embeddings"):
        sd["lm_head.weight"] = rnd(V, H)
    return sd


def write_checkpoint(path: pathlib.Path, cfg: dict, state: dict[str, torch.Tensor]) -> pathlib.Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    return path


def ensure_demo_model(root: pathlib.Path) -> pathlib.Path:
    """Build the demo checkpoint under root/demo-model once; later calls reuse it."""
    path = root / "demo-model"
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    tmp = root / "demo-model.tmp"
    write_checkpoint(tmp, DEMO_CONFIG, random_llama_state(DEMO_CONFIG))
    build_tokenizer().save(str(tmp / "tokenizer.json"))
    tmp.replace(path) if not path.exists() else None
    return path
