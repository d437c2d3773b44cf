"""Per-step batch metadata the kernels read; built once per step by the model runner."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


def to_device(values, dtype: torch.dtype, device) -> torch.Tensor:
    """A host list as a device tensor without waiting for the device.

    A plain ``torch.tensor(values, device=cuda)`` copies from pageable memory and then waits for
    the stream: with the previous step still queued (the engine launches step N+1 before it reads
    step N's tokens) that wait would undo the overlap. From pinned memory the copy is queued."""
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


@dataclass
class LoraBatch:
    """Which adapter each token uses.

    Tokens of one request are contiguous in the flattened batch, so the batch is also a list of
    segments (runs of tokens sharing one adapter slot). Base-model tokens have slot -1.
    """
    token_slot: torch.Tensor   # int32 [T]
    seg_indptr: torch.Tensor   # int32 [G+1], segment g is tokens seg_indptr[g]:seg_indptr[g+1]
    seg_slot: torch.Tensor     # int32 [G]
    max_seg_len: int           # host int: 1 for a pure decode batch
    max_rank: int              # host int: the largest rank of any adapter in the batch (0: none)
    seg_host: list[tuple[int, int, int]] | None = None  # (start, end, slot) on the host
    # decode only: tokens come sorted by slot, so runs of one adapter fill token tiles and the
    # grouped kernels read each adapter's rows once per tile instead of once per token
    grouped: bool = False
    # some adapter in the batch targets an MLP module (gate/up/down); when none does, the model
    # skips those launches (most adapters, S-LoRA's included, target attention only)
    mlp: bool = True
    # a step of prefills and decodes: (first token, end token, batch) per part, the prefill
    # segments on the segment schedule and the decode tokens (a suffix) on the decode schedule.
    # One segment launch over both would give each one-token segment a whole, mostly empty,
    # token tile: at 256 decodes that costs about twice the decode kernels.
    parts: list[tuple[int, int, "LoraBatch"]] | None = None
    # work plans of the compact decode shrink grid (kernels/triton_lora.py), built on the device
    # by their first launch with this batch and reused by later launches with the same key
    plans: dict = field(default_factory=dict, repr=False)
    # decode tiles are picked for this many tokens when set: a chunk of a step (decode_chunks)
    # launches the tiles of the whole step's batch size, not those of its own few tokens
    tile_tokens: int = 0

    def split(self) -> list[tuple[int, int, "LoraBatch"]]:
        return self.parts or [(0, self.token_slot.numel(), self)]

    @classmethod
    def build(cls, seq_lens: list[int], seq_slots: list[int], max_rank: int, device,
              grouped: bool = False, mlp: bool = True, decode_from: int | None = None) -> "LoraBatch":
        """decode_from: index of the first decode sequence (each of one token) after the prefills;
        with both present the batch is built in two parts (``parts``)."""
        whole = cls._build(seq_lens, seq_slots, max_rank, device, grouped and decode_from in (None, 0), mlp)
        if decode_from and decode_from < len(seq_lens) and max(seq_lens[:decode_from]) > 1:
            assert all(n == 1 for n in seq_lens[decode_from:]), "decode sequences hold one token each"
            n_pre = sum(seq_lens[:decode_from])
            whole.parts = [(0, n_pre, cls._build(seq_lens[:decode_from], seq_slots[:decode_from], max_rank, device,
                                                 False, mlp)),
                           (n_pre, sum(seq_lens), cls._build(seq_lens[decode_from:], seq_slots[decode_from:], max_rank,
                                                             device, grouped, mlp))]
        return whole

    @classmethod
    def _build(cls, seq_lens: list[int], seq_slots: list[int], max_rank: int, device, grouped: bool,
               mlp: bool) -> "LoraBatch":
        token_slot, indptr, slots, host, pos = [], [0], [], [], 0
        for n, s in zip(seq_lens, seq_slots):
            token_slot += [s] * n
            host.append((pos, pos + n, s))
            pos += n
            indptr.append(pos)
            slots.append(s)
        t = lambda v: to_device(v, torch.int32, device)  # noqa: E731
        return cls(t(token_slot), t(indptr), t(slots), max(seq_lens, default=0), max_rank, host, grouped, mlp)


@dataclass
class AttnBatch:
    """Where each sequence's KV lives and which query tokens belong to it.

    Sequence s owns query tokens q_indptr[s]:q_indptr[s+1]; they are the last positions of its
    context of context_lens[s] tokens (decode: 1 query; prefill: all; prefill over a cached
    prefix: the new ones). KV block b of sequence s, layer l: K in page block_tables[s, b, 2l],
    V in page block_tables[s, b, 2l+1].
    """
    block_tables: torch.Tensor  # int32 [S, max_blocks, 2L]
    q_indptr: torch.Tensor      # int32 [S+1]
    context_lens: torch.Tensor  # int32 [S]
    token_pages: torch.Tensor   # int32 [T, 2L]: the pages each new token's K/V go to
    token_offsets: torch.Tensor # int32 [T]: its row inside those pages
    max_q_len: int
    max_context: int
    q_host: list[tuple[int, int, int]] | None = None  # (q_start, q_end, context_len)


def chunk_bounds(n: int, weights: tuple[int, ...]) -> list[tuple[int, int]]:
    """[t0, t1) ranges that split n tokens in proportion to ``weights`` (empty ones dropped)."""
    total, acc, out, t0 = sum(weights), 0, [], 0
    for w in weights:
        acc += w
        t1 = round(n * acc / total)
        if t1 > t0:
            out.append((t0, t1))
        t0 = max(t0, t1)
    return out


def decode_chunks(attn: AttnBatch, lora: LoraBatch, bounds: list[tuple[int, int]]
                  ) -> list[tuple[int, int, AttnBatch, LoraBatch]]:
    """A pure decode batch (one query token per sequence, token t is sequence t) as chunks of
    tokens [t0, t1), each with its own AttnBatch and LoraBatch over views of the step's tensors.

    Both index pointers are then 0..n, so a chunk's are a prefix of them: no device op per step."""
    assert attn.max_q_len <= 1 and lora.max_seg_len <= 1 and not lora.parts and not lora.grouped
    T = lora.token_slot.numel()
    out = []
    for t0, t1 in bounds:
        n = t1 - t0
        q_host = [(i, i + 1, c) for i, (_, _, c) in enumerate(attn.q_host[t0:t1])] if attn.q_host else None
        seg_host = [(i, i + 1, s) for i, (_, _, s) in enumerate(lora.seg_host[t0:t1])] if lora.seg_host else None
        a = AttnBatch(attn.block_tables[t0:t1], attn.q_indptr[:n + 1], attn.context_lens[t0:t1],
                      attn.token_pages[t0:t1], attn.token_offsets[t0:t1], 1, attn.max_context, q_host)
        lb = LoraBatch(lora.token_slot[t0:t1], lora.seg_indptr[:n + 1], lora.seg_slot[t0:t1], 1, lora.max_rank,
                       seg_host, False, lora.mlp, tile_tokens=lora.tile_tokens or T)
        out.append((t0, t1, a, lb))
    return out
