"""Token sampling for a batch: greedy, temperature, top-k, top-p, per-request seeds, logprobs."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: float32 [S, V]. Returns, on logits' device, the chosen token per row and its
    log-probability under the model (the raw distribution, before temperature and truncation).
    Nothing here waits for the device: the caller decides when to read them."""
    logp = torch.log_softmax(logits, dim=-1)
    tokens = logits.argmax(dim=-1)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = logits[i] / p.temperature
        if p.top_k > 0 and p.top_k < row.numel():
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if 0.0 < p.top_p < 1.0:
            sorted_l, idx = row.sort(descending=True)
            cum = sorted_l.softmax(-1).cumsum(-1)
            drop = cum - sorted_l.softmax(-1) > p.top_p   # keep the smallest prefix reaching top_p
            row = row.scatter(0, idx, sorted_l.masked_fill(drop, float("-inf")))
        probs = row.softmax(-1)
        tokens[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    chosen = logp.gather(1, tokens[:, None])[:, 0]
    return tokens, chosen
