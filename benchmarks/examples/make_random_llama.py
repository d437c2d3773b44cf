"""Write a Llama-shaped checkpoint with random weights (S-LoRA benchmarks with dummy weights too):
throughput and latency do not depend on the values, and no download is needed.

    python benchmarks/examples/make_random_llama.py --preset llama-7b --out /models/llama-7b-random
    loraserve serve --model /models/llama-7b-random

Tensors are generated one at a time (on CUDA when available) in --dtype and written as
safetensors shards of about --shard-gb each, so host memory stays small.
"""
from __future__ import annotations

import argparse
import json
import pathlib

PRESETS = {
    # S-LoRA's S1/S2 base (Llama-7B) and S3/S4 base (Llama-13B); GQA and MLP shapes of newer families
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0),
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768, rope_theta=1000000.0),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=1024, max_position_embeddings=2048, rope_theta=10000.0),
}


def config_for(preset: str, layers: int | None = None) -> dict:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5,
           "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16",
           **PRESETS[preset]}
    if layers:
        cfg["num_hidden_layers"] = layers
    cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg


def tensor_shapes(cfg: dict):
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    D = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * D, cfg["num_key_value_heads"] * D
    yield "model.embed_tokens.weight", (V, H), "w"
    for i in range(cfg["num_hidden_layers"]):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        yield a + "q_proj.weight", (q, H), "w"
        yield a + "k_proj.weight", (kv, H), "w"
        yield a + "v_proj.weight", (kv, H), "w"
        yield a + "o_proj.weight", (H, q), "w"
        yield m + "gate_proj.weight", (I, H), "w"
        yield m + "up_proj.weight", (I, H), "w"
        yield m + "down_proj.weight", (H, I), "w"
        yield f"model.layers.{i}.input_layernorm.weight", (H,), "norm"
        yield f"model.layers.{i}.post_attention_layernorm.weight", (H,), "norm"
    yield "model.norm.weight", (H,), "norm"
    yield "lm_head.weight", (V, H), "w"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama-7b")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--shard-gb", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch
    from safetensors.torch import save_file

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config_for(args.preset, args.layers)
    cfg["torch_dtype"] = args.dtype
    dtype = getattr(torch, args.dtype)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(args.seed)
    shard, shard_bytes, shards, index = {}, 0, [], {}

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            shards.append(name)
            for k in shard:
                index[k] = name
            shard, shard_bytes = {}, 0

    total = 0
    for name, shape, kind in tensor_shapes(cfg):
        if kind == "norm":
            t = torch.ones(shape, dtype=dtype)
        else:
            t = (torch.randn(shape, generator=g, device=dev, dtype=torch.float32) * 0.02).to(dtype).cpu()
        shard[name] = t.contiguous()
        shard_bytes += t.numel() * t.element_size()
        total += t.numel() * t.element_size()
        if shard_bytes >= args.shard_gb * (1 << 30):
            flush()
    flush()
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": index}, indent=2))
    print(f"wrote {out} ({total / 1e9:.2f} GB in {len(shards)} shards, preset {args.preset})")


if __name__ == "__main__":
    main()
