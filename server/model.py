"""A Llama-family decoder (Llama-2/3, Mistral, Qwen2) over a flattened batch of mixed requests.

One forward runs prefill and decode tokens of many requests together. Base GEMMs go through
torch (cuBLAS on CUDA); LoRA, KV writes and attention go through kernels.get_ops(), which reads
adapter rows and KV pages in place from the unified pool.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
from dataclasses import dataclass

import torch

from kernels import get_ops
from kernels.batch import AttnBatch, LoraBatch, chunk_bounds, decode_chunks
from server.config import TARGET_MODULES, ModelConfig, rope_inv_freq
from server.pool import AdapterTable, UnifiedPool
from server.tp import COLUMN, TP, gather_rank_split, shard_config, shard_state

M_IDX = {m: i for i, m in enumerate(TARGET_MODULES)}
QKV = ("q_proj", "k_proj", "v_proj")        # LoRA groups: modules that read one input and whose
GATE_UP = ("gate_proj", "up_proj")          # outputs are adjacent columns of one fused GEMM


def _overlap_setting(value: str) -> tuple[int, ...]:
    """LORASERVE_LORA_OVERLAP: "off", or the chunk weights of a decode batch ("1,3,3,1")."""
    value = value.strip().lower()
    if value in ("", "off", "0", "none"):
        return ()
    return tuple(int(w) for w in value.split(","))


# Decode LoRA beside attention (LlamaModel._attention_beside_lora): the chunks a decode batch is cut
# into, as weights, from OVERLAP_MIN_T tokens; on CUDA only (on a CPU the streams are one order).
OVERLAP = _overlap_setting(os.environ.get("LORASERVE_LORA_OVERLAP", "off"))
OVERLAP_MIN_T = int(os.environ.get("LORASERVE_LORA_OVERLAP_MIN_T", "64"))
# the side stream's priority (lower is higher on CUDA): "high" lets the LoRA's programs take SMs
# ahead of attention's as they free up, since the next chunk's attention waits for them
OVERLAP_PRIORITY = os.environ.get("LORASERVE_LORA_OVERLAP_PRIORITY", "high")


class _Streams:
    """The current stream and a side stream, with events between them; on a CPU no-ops (one
    program order)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.side = None
        if self.cuda:
            self.side = torch.cuda.Stream(device, priority=-1 if OVERLAP_PRIORITY == "high" else 0)

    def on_side(self):
        return torch.cuda.stream(self.side) if self.cuda else contextlib.nullcontext()

    def record(self):
        """An event at this point of the current stream."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record()
        return ev

    def wait(self, ev) -> None:
        """The current stream waits for ``ev``."""
        if ev is not None:
            torch.cuda.current_stream().wait_event(ev)


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


class LlamaModel:
    def __init__(self, cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device | str, tp: TP | None = None):
        """cfg: the full model's config; with tensor parallelism this rank keeps its shard and
        self.cfg becomes the per-rank shapes (self.full_cfg the whole model's)."""
        self.tp = tp or TP()
        self.full_cfg = cfg
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
        self.lm_head = take("lm_head.weight") if "lm_head.weight" in state else self.embed
        self.inv_freq = rope_inv_freq(cfg).to(self.device)
        # row-parallel LoRA writes only this rank's slice of the output columns
        self._row_cols = self.tp.part(cfg.hidden_size) if self.tp.enabled else slice(None)
        self.scale = cfg.head_dim ** -0.5
        self.overlap, self.overlap_min_t = OVERLAP, OVERLAP_MIN_T
        self._streams: _Streams | None = None

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
        prefill steps, host time."""
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
            v = self.ops.lora_shrink(xs, table.flat, table.rows, meta, part, table.row_scale)
            self.ops.lora_expand(ys, v, table.flat, table.rows, meta, table.scaling, part, w, table.row_scale)

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

    def _overlap_chunks(self, attn: AttnBatch, lora: LoraBatch) -> list | None:
        """The chunks of a decode batch whose LoRA runs beside attention, or None: only pure
        decode batches on the per-token schedule, without tensor parallelism."""
        T = lora.token_slot.numel()
        if (not self.overlap or T < self.overlap_min_t or self.tp.enabled or lora.grouped or lora.parts
                or lora.max_seg_len > 1 or attn.max_q_len > 1 or attn.context_lens.numel() != T):
            return None
        bounds = chunk_bounds(T, self.overlap)
        if len(bounds) < 2:
            return None
        if self._streams is None:
            self._streams = _Streams(self.device)
        return decode_chunks(attn, lora, bounds)

    def _attention_beside_lora(self, li: int, L: Layer, h: torch.Tensor, qkv: torch.Tensor, cos: torch.Tensor,
                               sin: torch.Tensor, kv: torch.Tensor, chunks: list, table: AdapterTable,
                               dy: torch.Tensor) -> torch.Tensor:
        """One layer's attention block of a decode batch in chunks, the LoRA on a side stream.

        Decode attention is bound by HBM bandwidth, the decode LoRA kernels by latency (their
        programs spend most of their time in chains of small dependent loads): beside each other
        the two share the SMs and the bandwidth, where one after the other the LoRA's idle
        latency is paid in full. The side stream runs the q/k/v LoRA of every chunk in turn as
        soon as the q/k/v GEMM is done; the main stream takes chunk i's rope and attention once
        its LoRA is in. The o LoRA of chunk i follows its attention on the side stream, into
        ``dy``, which the o GEMM adds as its C matrix (one cuBLAS call: y = dy + o W^T). Only the
        first chunk's q/k/v LoRA and the last one's o LoRA are exposed, so those chunks are small.

        Memory across streams: every tensor the side stream reads was made before an event it
        waits for, and the main stream waits for the side stream's last event before the o GEMM,
        so no block is freed and handed out again while the other stream may still use it."""
        cfg, ops, st = self.cfg, self.ops, self._streams
        qw, kw = cfg.q_width, cfg.kv_width
        T = h.shape[0]
        gemm_done = st.record()
        lora_in = []
        with st.on_side():
            st.wait(gemm_done)
            for t0, t1, _, lb in chunks:
                self._lora(qkv[t0:t1], h[t0:t1], li, QKV, lb, table, (qw, kw, kw))
                lora_in.append(st.record())
            dy.zero_()
        o = torch.empty(T, cfg.num_heads, cfg.head_dim, dtype=qkv.dtype, device=qkv.device)
        attended = []
        for (t0, t1, ab, _), ev in zip(chunks, lora_in):
            st.wait(ev)
            q = ops.rope_write_kv(qkv[t0:t1], cos[t0:t1], sin[t0:t1], kv, li, ab, cfg.num_heads, cfg.num_kv_heads)
            ops.paged_attention(q, kv, li, ab, self.scale, out=o[t0:t1])
            attended.append(st.record())
        o = o.view(T, qw)
        with st.on_side():
            for (t0, t1, _, lb), ev in zip(chunks, attended):
                st.wait(ev)
                self._lora(dy[t0:t1], o[t0:t1], li, ("o_proj",), lb, table)
            o_lora_in = st.record()
        st.wait(o_lora_in)
        return torch.addmm(dy, o, L.o.t())

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
        chunks = self._overlap_chunks(attn, lora) if use_lora else None
        dy = torch.empty(T, cfg.hidden_size, dtype=self.dtype, device=self.device) \
            if chunks else None
        x = self.embed[input_ids]
        h = ops.rms_norm(x, self.layers[0].ln1, cfg.rms_norm_eps)
        for li, L in enumerate(self.layers):
            qkv = ops.linear(h, L.qkv, L.qkv_bias)
            if chunks:
                out = self._attention_beside_lora(li, L, h, qkv, cos, sin, kv, chunks, table, dy)
            else:
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
