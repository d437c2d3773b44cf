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
