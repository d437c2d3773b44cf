"""Token sampling for a batch: greedy, temperature, top-k, top-p, per-request seeds, logprobs."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-5


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
        # below this, logits / temperature overflows float32 to inf and softmax gives NaN (which
        # would fail the whole step); such a temperature is greedy in all but name (vLLM's eps)
        return self.temperature < GREEDY_BELOW


def token_generator(seed: int, position: int, device: torch.device) -> torch.Generator:
    """The generator for one token of a seeded request: a function of (seed, the token's position
    in the sequence) alone, so that token is the same whatever came before it in the engine."""
    digest = hashlib.blake2b(seed.to_bytes(8, "little") + position.to_bytes(8, "little"), digest_size=8).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest, "little") >> 1)


def sample(logits: torch.Tensor, params: list[SamplingParams],
           seeds: list[tuple[int | None, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: float32 [S, V]; seeds: per row (the request's seed or None, the position of the
    token being sampled). Returns, on logits' device, the chosen token per row and its
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
        seed, position = seeds[i]
        gen = None if seed is None else token_generator(seed, position, logits.device)
        tokens[i] = torch.multinomial(probs, 1, generator=gen)[0]
    chosen = logp.gather(1, tokens[:, None])[:, 0]
    return tokens, chosen
