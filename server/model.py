"""A Llama-family decoder (Llama-2/3, Mistral, Qwen2) over a flattened batch of mixed requests.

One forward runs prefill and decode tokens of many requests together. Base GEMMs go through
torch (cuBLAS on CUDA); LoRA, KV writes and attention go through kernels.get_ops(), which reads
adapter rows and KV pages in place from the unified pool.
"""
from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

import torch

from kernels import get_ops
from kernels.batch import AttnBatch, LoraBatch
from server.config import TARGET_MODULES, ModelConfig, rope_inv_freq
from server.pool import AdapterTable, UnifiedPool
from server.tp import COLUMN, TP, gather_rank_split, shard_config, shard_state

M_IDX = {m: i for i, m in enumerate(TARGET_MODULES)}
QKV = ("q_proj", "k_proj", "v_proj")        # LoRA groups: modules that read one input and whose
GATE_UP = ("gate_proj", "up_proj")          # outputs are adjacent columns of one fused GEMM


@dataclass
class Layer:
    ln1: torch.Tensor
    qkv: torch.Tensor            # [q + 2kv, H]: q, k, v fused into one GEMM
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    ln2: torch.Tensor
    gate_up: torch.Tensor        # [2I, H]: gate and up fused
    down: torch.Tensor


def load_state_dict(path: pathlib.Path) -> dict[str, torch.Tensor]:
    """All tensors of a single or sharded safetensors checkpoint, on the CPU."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} holds no *.safetensors weights")
    out = {}
    for f in files:
        with safe_open(str(path / f), framework="pt", device="cpu") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    return out


def check_shapes(state: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Every weight the model reads has the shape config.json implies: a config that does not
    match its checkpoint (num_key_value_heads left out, say) fails here, naming both, instead
    of failing every request."""
    p = "model."
    want = {p + "embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size), p + "norm.weight": (cfg.hidden_size,)}
    if not cfg.tie_word_embeddings:
        want["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    for i in range(cfg.num_layers):
        for m in TARGET_MODULES:
            d_in, d_out = cfg.module_dims(m)
            part = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            want[f"{p}layers.{i}.{part}.{m}.weight"] = (d_out, d_in)
    for name, shape in want.items():
        if name not in state:
            hint = " (tie_word_embeddings is false)" if name == "lm_head.weight" else ""
            raise ValueError(f"the checkpoint has no {name}{hint}")
        if tuple(state[name].shape) != shape:
            raise ValueError(f"{name} has shape {tuple(state[name].shape)} but config.json implies {shape} "
                             f"(hidden_size {cfg.hidden_size}, num_attention_heads {cfg.num_heads}, "
                             f"num_key_value_heads {cfg.num_kv_heads}, head_dim {cfg.head_dim}, "
                             f"intermediate_size {cfg.intermediate_size}, vocab_size {cfg.vocab_size})")


class LlamaModel:
    def __init__(self, cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device | str, tp: TP | None = None):
        """cfg: the full model's config; with tensor parallelism this rank keeps its shard and
        self.cfg becomes the per-rank shapes (self.full_cfg the whole model's)."""
        self.tp = tp or TP()
        self.full_cfg = cfg
        check_shapes(state, cfg)
        state = shard_state(state, cfg, self.tp)
        cfg = shard_config(cfg, self.tp)
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.ops = get_ops(self.device)
        take = lambda name: state.pop(name).to(self.device, dtype)  # noqa: E731
        p = "model."
        self.embed = take(p + "embed_tokens.weight")
        self.layers = []
        for i in range(cfg.num_layers):
            a, m = f"{p}layers.{i}.self_attn.", f"{p}layers.{i}.mlp."
            bias = None
            if cfg.attention_bias and (a + "q_proj.bias") in state:
                bias = torch.cat([take(a + f"{x}_proj.bias") for x in "qkv"])
            self.layers.append(Layer(
                ln1=take(f"{p}layers.{i}.input_layernorm.weight"),
                qkv=torch.cat([take(a + f"{x}_proj.weight") for x in "qkv"]),
                qkv_bias=bias, o=take(a + "o_proj.weight"),
                ln2=take(f"{p}layers.{i}.post_attention_layernorm.weight"),
                gate_up=torch.cat([take(m + "gate_proj.weight"), take(m + "up_proj.weight")]),
                down=take(m + "down_proj.weight")))
        self.norm = take(p + "norm.weight")
        # tied: the embeddings, even where a checkpoint also stores an lm_head (transformers ignores it)
        self.lm_head = self.embed if cfg.tie_word_embeddings else take("lm_head.weight")
        self.inv_freq = rope_inv_freq(cfg).to(self.device)
        # row-parallel LoRA writes only this rank's slice of the output columns
        self._row_cols = self.tp.part(cfg.hidden_size) if self.tp.enabled else slice(None)
        self.scale = cfg.head_dim ** -0.5

    @classmethod
    def from_dir(cls, path: str | pathlib.Path, dtype: torch.dtype, device, tp: TP | None = None) -> "LlamaModel":
        path = pathlib.Path(path)
        return cls(ModelConfig.from_dir(path), load_state_dict(path), dtype, device, tp)

    @property
    def weight_bytes(self) -> int:
        ts = [self.embed, self.norm] + ([] if self.lm_head is self.embed else [self.lm_head])
        for L in self.layers:
            ts += [L.ln1, L.qkv, L.o, L.ln2, L.gate_up, L.down]
        return sum(t.numel() * t.element_size() for t in ts)

    def _lora(self, y: torch.Tensor, x: torch.Tensor, layer: int, modules: tuple[str, ...], lora: LoraBatch,
              table: AdapterTable, widths: tuple[int, ...] | None = None) -> None:
        """y += LoRA deltas of ``modules`` (adjacent in TARGET_MODULES, all reading x), whose
        outputs are adjacent column ranges of y of the given widths (one module: all of y): one shrink and one expand
        launch for the group (q/k/v; gate/up), where one per module costs launches and, in eager
        prefill steps, host time; decode tokens on quantized rows take one fused launch (lora_apply)."""
        if self.tp.enabled:
            off = 0
            for m, w in zip(modules, widths or (y.shape[1],)):
                self._lora_tp(y[:, off:off + w], x, layer, m, lora, table)
                off += w
            return
        i = M_IDX[modules[0]]
        meta = table.meta[:, layer, i] if len(modules) == 1 else table.meta[:, layer, i:i + len(modules)]
        w = widths if len(modules) > 1 else None
        for t0, t1, part in lora.split():     # prefill segments, then decode tokens (mixed steps)
            xs, ys = (x, y) if part is lora else (x[t0:t1], y[t0:t1])
            self.ops.lora_apply(ys, xs, table.flat, table.rows, meta, table.scaling, part, w, table.row_scale)

    def _lora_tp(self, y: torch.Tensor, x: torch.Tensor, layer: int, module: str, lora: LoraBatch,
                 table: AdapterTable) -> None:
        """One module under tensor parallelism (A is split by rank or by input: a collective sits
        between shrink and expand, so modules are not fused)."""
        meta = table.meta[:, layer, M_IDX[module]]
        v = self.ops.lora_shrink(x, table.flat, table.rows, meta, lora, table.row_scale)
        if module in COLUMN:    # rank-split A: gather the full rank-r vector
            slots = lora.token_slot.long()
            a_rows = torch.where(slots >= 0, meta[slots.clamp(min=0), 2], 0)
            v = gather_rank_split(v, a_rows, lora.max_rank, self.tp)
        else:                   # input-split A: sum the partial products
            v = self.tp.all_reduce(v.float()).to(v.dtype)
        self.ops.lora_expand(y, v, table.flat, table.rows, meta, table.scaling, lora, row_scale=table.row_scale)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttnBatch,
                lora: LoraBatch | None, pool: UnifiedPool, table: AdapterTable,
                logits_idx: torch.Tensor) -> torch.Tensor:
        """input_ids/positions: [T]; returns float32 logits [len(logits_idx), vocab]."""
        cfg, ops = self.cfg, self.ops
        T = input_ids.shape[0]
        qw, kw = cfg.q_width, cfg.kv_width
        I = cfg.intermediate_size
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        cos, sin = freqs.cos(), freqs.sin()
        kv = pool.kv_view()
        use_lora = lora is not None and lora.max_rank > 0
        mlp_lora = use_lora and lora.mlp    # some adapter in the batch targets the MLP
        x = self.embed[input_ids]
        h = ops.rms_norm(x, self.layers[0].ln1, cfg.rms_norm_eps)
        for li, L in enumerate(self.layers):
            qkv = ops.linear(h, L.qkv, L.qkv_bias)
            if use_lora:
                self._lora(qkv, h, li, QKV, lora, table, (qw, kw, kw))
            q = ops.rope_write_kv(qkv, cos, sin, kv, li, attn, cfg.num_heads, cfg.num_kv_heads)
            o = ops.paged_attention(q, kv, li, attn, self.scale).reshape(T, qw)
            out = ops.linear(o, L.o)
            if use_lora:   # under TP: only this rank's output columns; the all-reduce adds the rest
                self._lora(out[:, self._row_cols], o, li, ("o_proj",), lora, table)
            # the residual add and the next norm are one kernel (x is updated in place)
            h = ops.add_rms_norm(x, self.tp.all_reduce(out), L.ln2, cfg.rms_norm_eps)
            gu = ops.linear(h, L.gate_up)
            if mlp_lora:
                self._lora(gu, h, li, GATE_UP, lora, table, (I, I))
            if mlp_lora:     # down_proj's LoRA reads the activation: it is kept
                a = ops.silu_mul(gu)
                d = ops.linear(a, L.down)
                self._lora(d[:, self._row_cols], a, li, ("down_proj",), lora, table)
            else:
                d = ops.silu_mul_linear(gu, L.down)
            d = self.tp.all_reduce(d)
            if li + 1 < len(self.layers):
                h = ops.add_rms_norm(x, d, self.layers[li + 1].ln1, cfg.rms_norm_eps)
            else:
                x.add_(d)
        x = ops.rms_norm(x[logits_idx], self.norm, cfg.rms_norm_eps)
        return ops.linear(x, self.lm_head).float()
