"""Decode steps replayed from CUDA graphs, so Python's per-kernel launch cost leaves the
critical path (a Llama-7B decode step launches ~1,500 kernels; at batch 1 the GPU needs ~5 ms).

One graph per batch-size bucket and LoRA schedule: per-token, grouped by adapter, and none (a
base-only batch pays nothing for LoRA); the two LoRA schedules are captured with and without the
MLP modules (a batch whose adapters all target attention only skips those launches). Every per-step input lives in static buffers that the step copies
into; rows past the real batch are padding that reads and writes only the pool's scratch page.
Graphs are captured for a fixed rank cap and context cap: a batch beyond either runs eagerly.
"""
from __future__ import annotations

import logging

import torch

from kernels.batch import AttnBatch, LoraBatch

log = logging.getLogger("loraserve.graphs")

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
# LoRA schedules a decode graph is captured for: per-token ("token"), tokens grouped by adapter
# ("grouped", batches where adapters are shared), and none (a base-model-only batch)
LORA_MODES = ("token", "grouped", None)


class DecodeGraphs:
    def __init__(self, model, pool, table, max_batch: int, max_context: int, max_rank: int,
                 batches: list[int] | None = None):
        """batches: capture only the buckets these batch sizes replay (a benchmark timing a few
        sizes skips the ~30 s of capturing all of them); None: every bucket up to max_batch."""
        self.model, self.pool, self.table = model, pool, table
        self.buckets = [b for b in BUCKETS if b <= max_batch] or [1]
        if batches:
            self.buckets = sorted({next((b for b in self.buckets if b >= n), self.buckets[-1]) for n in batches})
        self.max_context = max_context
        self.max_rank = max_rank
        self.max_blocks = -(-max_context // pool.block_tokens)
        n, dev = self.buckets[-1], model.device
        L2 = 2 * model.cfg.num_layers
        i32 = dict(dtype=torch.int32, device=dev)
        self.ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(n, dtype=torch.int64, device=dev)
        self.bt = torch.full((n, self.max_blocks, L2), pool.scratch_page, **i32)
        self.ctx = torch.ones(n, **i32)
        self.q_indptr = torch.arange(n + 1, **i32)
        self.token_pages = torch.full((n, L2), pool.scratch_page, **i32)
        self.token_off = torch.zeros(n, **i32)
        self.logits_idx = torch.arange(n, dtype=torch.int64, device=dev)
        self.token_slot = torch.full((n,), -1, **i32)
        self.graphs: dict[tuple[int, str | None, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.mempool = None

    def _batches(self, bs: int, lora: str | None, mlp: bool):
        attn = AttnBatch(self.bt[:bs], self.q_indptr[:bs + 1], self.ctx[:bs], self.token_pages[:bs],
                         self.token_off[:bs], max_q_len=1, max_context=self.max_context)
        lb = LoraBatch(self.token_slot[:bs], self.q_indptr[:bs + 1], self.token_slot[:bs],
                       max_seg_len=1, max_rank=self.max_rank, grouped=lora == "grouped", mlp=mlp) if lora else None
        return attn, lb

    def _forward(self, bs: int, lora: str | None, mlp: bool) -> torch.Tensor:
        attn, lb = self._batches(bs, lora, mlp)
        return self.model.forward(self.ids[:bs], self.pos[:bs], attn, lb, self.pool, self.table,
                                  self.logits_idx[:bs])

    def capture(self) -> None:
        """Capture every bucket (largest first, so smaller graphs reuse its memory)."""
        stream = torch.cuda.Stream(self.model.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for lora, mlp in self.variants():
                for bs in reversed(self.buckets):
                    for _ in range(2):            # warm up: compile and autotune outside capture
                        self._forward(bs, lora, mlp)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=self.mempool, stream=stream):
                        out = self._forward(bs, lora, mlp)
                    self.mempool = g.pool()
                    self.graphs[(bs, lora, mlp)] = (g, out)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        log.info("captured %d decode graphs (batch up to %d, context %d, rank %d)",
                 len(self.graphs), self.buckets[-1], self.max_context, self.max_rank)

    @staticmethod
    def variants() -> list[tuple[str | None, bool]]:
        """(LoRA schedule, MLP LoRA) pairs captured per bucket."""
        return [(m, mlp) for m in LORA_MODES for mlp in ((True, False) if m else (False,))]

    def fits(self, n: int, max_rank: int, max_context: int, max_blocks: int) -> bool:
        return (n <= self.buckets[-1] and max_rank <= self.max_rank and max_context <= self.max_context
                and max_blocks <= self.max_blocks)

    def run(self, ids, pos, bt, ctx, token_pages, token_off, slots, lora: str | None,
            mlp: bool = True) -> torch.Tensor:
        """Copy one decode batch into the static buffers, replay, return logits [n, vocab]."""
        n = ids.numel()
        bs = next(b for b in self.buckets if b >= n)
        nb = bt.shape[1]
        self.ids[:n].copy_(ids, non_blocking=True)
        self.pos[:n].copy_(pos, non_blocking=True)
        self.bt[:n, :nb].copy_(bt, non_blocking=True)
        self.ctx[:n].copy_(ctx, non_blocking=True)
        self.token_pages[:n].copy_(token_pages, non_blocking=True)
        self.token_off[:n].copy_(token_off, non_blocking=True)
        self.token_slot[:n].copy_(slots, non_blocking=True)
        if bs > n:     # padding rows: base model, one token of context in the scratch page
            # (fill_: assigning a Python number to a slice of a CUDA tensor waits for the device)
            self.ids[n:bs].zero_()
            self.pos[n:bs].zero_()
            self.ctx[n:bs].fill_(1)
            self.bt[n:bs, 0].fill_(self.pool.scratch_page)
            self.token_pages[n:bs].fill_(self.pool.scratch_page)
            self.token_off[n:bs].zero_()
            self.token_slot[n:bs].fill_(-1)
        g, out = self.graphs[(bs, lora, mlp and lora is not None)]
        g.replay()
        return out[:n]
