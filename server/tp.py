"""Tensor parallelism over torch.distributed: Megatron-style base weights, S-LoRA's LoRA split.

Base model: q/k/v and gate/up are column-parallel (each rank holds its heads / its slice of the
intermediate size); o_proj and down_proj are row-parallel (each rank holds the matching input
slice and produces a partial sum), followed by one all-reduce each. Embeddings, norms and the
LM head are replicated, so every rank samples the same tokens.

LoRA, as S-LoRA partitions it:
* column-parallel targets (q, k, v, gate, up): A is split by rank (r / world rows per rank), the
  shrink outputs are all-gathered into the full rank-r vector, and B is split by output columns
  to match the base weight's shard;
* row-parallel targets (o, down): A is split by input columns (its partial products are summed
  with an all-reduce), and B is split by output columns: each rank adds only its columns of the
  LoRA output into its partial sum, so the base model's all-reduce also assembles the LoRA result.

Each rank keeps its own unified pool holding its KV heads and its adapter shards.
"""
from __future__ import annotations

import dataclasses

import torch

from server.config import ModelConfig

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")


@dataclasses.dataclass
class TP:
    rank: int = 0
    world: int = 1
    group: object = None        # for device tensors (NCCL on CUDA); None: the default group
    cpu_group: object = None    # for host objects (gloo); None: the default group (CPU runs)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            import torch.distributed as dist
            dist.all_reduce(t, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[world, *t.shape]: every rank's t, in rank order."""
        import torch.distributed as dist
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t.contiguous(), group=self.group)
        return torch.stack(out)

    def part(self, n: int) -> slice:
        if n % self.world:
            raise ValueError(f"{n} does not split over {self.world} ranks")
        k = n // self.world
        return slice(self.rank * k, (self.rank + 1) * k)


def shard_config(cfg: ModelConfig, tp: TP) -> ModelConfig:
    """The per-rank shapes: heads and the intermediate size split, hidden size whole."""
    if not tp.enabled:
        return cfg
    for what, n in (("num_attention_heads", cfg.num_heads), ("num_key_value_heads", cfg.num_kv_heads),
                    ("intermediate_size", cfg.intermediate_size)):
        if n % tp.world:
            raise ValueError(f"{what}={n} does not split over {tp.world} ranks")
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // tp.world, num_kv_heads=cfg.num_kv_heads // tp.world,
                               intermediate_size=cfg.intermediate_size // tp.world)


def shard_state(state: dict[str, torch.Tensor], cfg: ModelConfig, tp: TP) -> dict[str, torch.Tensor]:
    """Slice a full Hugging Face state dict to this rank's shard (cfg: the full config)."""
    if not tp.enabled:
        return state
    D = cfg.head_dim
    out = {}
    for name, t in state.items():
        mod = name.split(".")[-2] if name.endswith((".weight", ".bias")) else ""
        if mod in ("q_proj", "k_proj", "v_proj"):
            heads = cfg.num_heads if mod == "q_proj" else cfg.num_kv_heads
            s = tp.part(heads)
            t = t[s.start * D:s.stop * D]
        elif mod in ("gate_proj", "up_proj"):
            t = t[tp.part(t.shape[0])]
        elif mod == "o_proj":
            s = tp.part(cfg.num_heads)
            t = t[:, s.start * D:s.stop * D]
        elif mod == "down_proj":
            t = t[:, tp.part(t.shape[1])]
        out[name] = t.contiguous()
    return out


def shard_lora(weights, cfg: ModelConfig, tp: TP):
    """This rank's shard of a parsed adapter (cfg: the full config)."""
    if not tp.enabled:
        return weights
    D = cfg.head_dim
    out = {}
    for (layer, module), (a, b) in weights.weights.items():
        r = a.shape[0]
        if module in COLUMN:
            if r % tp.world:
                raise ValueError(f"rank {r} of {weights.adapter_id} does not split over {tp.world} ranks")
            if module in ("q_proj", "k_proj", "v_proj"):
                heads = cfg.num_heads if module == "q_proj" else cfg.num_kv_heads
                s = tp.part(heads)
                cols = slice(s.start * D, s.stop * D)
            else:
                cols = tp.part(b.shape[0])
            a, b = a[tp.part(r)], b[cols]
        else:   # row-parallel: A by input columns, B by output columns
            if module == "o_proj":
                s = tp.part(cfg.num_heads)
                a = a[:, s.start * D:s.stop * D]
            else:
                a = a[:, tp.part(a.shape[1])]
            b = b[tp.part(b.shape[0])]
        out[(layer, module)] = (a.contiguous(), b.contiguous())
    return dataclasses.replace(weights, weights=out)


def gather_rank_split(v_local: torch.Tensor, a_rows: torch.Tensor, max_rank: int, tp: TP) -> torch.Tensor:
    """All-gather the column-parallel shrink outputs into the full rank-r vectors.

    v_local [T, Rl]: token t's first a_rows[t] columns are its rank shard. Rank j's shard covers
    columns j*a : (j+1)*a of the full vector (A was split by rank in rank order).
    """
    g = tp.all_gather(v_local)                                   # [world, T, Rl]
    T = v_local.shape[0]
    c = torch.arange(max_rank, device=v_local.device)[None, :]   # [1, R]
    a = a_rows.long()[:, None].clamp(min=1)                      # [T, 1]
    j = (c // a).clamp(max=tp.world - 1)
    i = (c % a).clamp(max=v_local.shape[1] - 1)
    t = torch.arange(T, device=v_local.device)[:, None].expand(T, max_rank)
    full = g[j, t, i]
    return torch.where(c < a_rows.long()[:, None] * tp.world, full, torch.zeros((), dtype=full.dtype))
