"""Shared test helpers: tiny random Llama checkpoints and PEFT adapters with non-zero weights."""
from __future__ import annotations

import json
import pathlib

import torch

from server.demo import random_llama_state, write_checkpoint

TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 97,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
}

ADAPTER_SPECS = {   # name: (rank, alpha, target modules)
    "attn": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "full": (16, 8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "qv": (4, 8, ["q_proj", "v_proj"]),
    "wide": (64, 32, ["q_proj", "v_proj", "o_proj", "down_proj"]),
}


def make_model(path: pathlib.Path, seed: int = 0, **overrides) -> pathlib.Path:
    cfg = {**TINY, **overrides}
    return write_checkpoint(path, cfg, random_llama_state(cfg, seed=seed, std=0.1))


def make_adapter(path: pathlib.Path, model_cfg: dict, rank: int, alpha: float, targets: list[str],
                 seed: int, use_rslora: bool = False, std: float = 0.1) -> pathlib.Path:
    """A PEFT folder as PEFT writes it, with random non-zero A and B (PEFT zeros B at init)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    H, I = model_cfg["hidden_size"], model_cfg["intermediate_size"]
    D = model_cfg.get("head_dim") or H // model_cfg["num_attention_heads"]
    q, kv = model_cfg["num_attention_heads"] * D, model_cfg["num_key_value_heads"] * D
    dims = {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H),
            "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}
    tensors = {}
    for layer in range(model_cfg["num_hidden_layers"]):
        for m in targets:
            part = "self_attn" if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            d_in, d_out = dims[m]
            pre = f"base_model.model.model.layers.{layer}.{part}.{m}"
            tensors[f"{pre}.lora_A.weight"] = torch.randn(rank, d_in, generator=g) * std
            tensors[f"{pre}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) * std
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "target_modules": targets, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": use_rslora, "base_model_name_or_path": None, "inference_mode": True}))
    return path


def _hf_model(model_dir: pathlib.Path, adapter_dir: pathlib.Path | None):
    """The reference: transformers (+ peft for an adapter) in float32, eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.eval()


def hf_reference(model_dir: pathlib.Path, adapter_dir: pathlib.Path | None, prompt: list[int],
                 n_new: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probabilities from transformers (+ peft) in float32."""
    model = _hf_model(model_dir, adapter_dir)
    ids = torch.tensor([prompt])
    toks, lps = [], []
    with torch.no_grad():
        for _ in range(n_new):
            logits = model(input_ids=ids).logits[0, -1].float()
            lp = torch.log_softmax(logits, -1)
            t = int(logits.argmax())
            toks.append(t)
            lps.append(float(lp[t]))
            ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
    return toks, lps


def hf_scores(model_dir: pathlib.Path, adapter_dir: pathlib.Path | None, prompt: list[int],
              tokens: list[int]) -> list[tuple[float, float]]:
    """Teacher-forced: for each of ``tokens`` after ``prompt``, (its log-probability, the best
    token's) from transformers (+ peft) in float32. Checks output that may leave the greedy path
    at a near-tie (quantized weights): each token must be near-best and near its reference score."""
    model = _hf_model(model_dir, adapter_dir)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0].float()
    lp = torch.log_softmax(logits[len(prompt) - 1:len(prompt) - 1 + len(tokens)], -1)
    return [(float(lp[i, t]), float(lp[i].max())) for i, t in enumerate(tokens)]


def run_engine(engine, requests, timeout: float = 120.0):
    """Submit requests to a started engine; wait until all finish; return their outputs."""
    import time

    outs = {r.request_id: [] for r in requests}
    for r in requests:
        r.emit = outs[r.request_id].append
        engine.submit(r)
    deadline = time.monotonic() + timeout
    # done when each request's last Output has arrived: the engine marks a request finished when
    # it decides so, and hands that Output over at its next flush (r.finished alone raced it)
    while not all(o and o[-1].finish is not None for o in outs.values()):
        if time.monotonic() > deadline:
            raise TimeoutError("engine did not finish in time")
        time.sleep(0.01)
    return {rid: (sum((o.token_ids for o in os_), []), sum((o.logprobs for o in os_), []), os_[-1])
            for rid, os_ in outs.items()}


def wait_for(cond, timeout: float = 10.0, interval: float = 0.01) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return cond()


class ServerThread:
    """`loraserve serve` in-process on a background event loop, on a free loopback port."""

    def __init__(self, argv: list[str]):
        import argparse
        import asyncio
        import threading

        from server.app import add_serve_args, start

        p = argparse.ArgumentParser()
        add_serve_args(p)
        self.args = p.parse_args(["--port", "0", *argv])
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.running = asyncio.run_coroutine_threadsafe(start(self.args), self.loop).result(timeout=120)
        self.port = self.running.port
        self.target = f"127.0.0.1:{self.port}"
        self.engine = self.running.engine

    def stop(self) -> None:
        import asyncio

        if not self._thread.is_alive():     # stopped already
            return
        asyncio.run_coroutine_threadsafe(self.running.stop(grace=1), self.loop).result(timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
