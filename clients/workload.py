"""S-LoRA's synthetic workload (arXiv 2311.03285, Section 7.1, and its benchmarks/trace.py).

- ``n`` adapters; the adapter of each request is drawn from a power law with exponent ``alpha``:
  S-LoRA draws ``x ~ Power(alpha)`` on [0, 1] (density ``alpha * x**(alpha - 1)``, i.e. numpy's
  ``power``) and takes adapter ``floor(x * n)``, so adapter ``i`` (0-based) has probability
  ``((i + 1) / n)**alpha - (i / n)**alpha``. ``alpha = 1`` is uniform; smaller ``alpha``
  concentrates the traffic on the first adapters (rank ``i`` gets ``~ alpha * (i/n)**(alpha-1) / n``).
- Arrivals form a gamma renewal process of rate ``R`` (requests/s) and coefficient of variation
  ``cv``: inter-arrival times ~ Gamma(shape=1/cv**2, scale=cv**2/R) (mean 1/R, std cv/R;
  ``cv = 1`` is Poisson). The first request arrives after the first interval, as in S-LoRA.
- ``int(R * duration)`` requests (optionally capped at ``max_requests``).
- Input and output lengths uniform integers in ``[lo, hi)``; requests set ``ignore_eos`` so the
  output length is exact. Prompts are random token ids (no tokenizer needed).
- The draws are S-LoRA's, in its order, from numpy's legacy generator seeded with ``seed``
  (``RandomState``, the stream of its ``np.random.seed``): adapters, input lengths, output
  lengths, intervals, each for all ``int(R * duration)`` requests. So a spec gives the trace
  S-LoRA's ``generate_requests`` gives for the same seed (``max_requests`` keeps its first
  requests). The prompts' token ids come after, from the same stream.

A workload can be saved and replayed as a JSONL trace: one object per line with ``timestamp``
(seconds from the start), ``adapter_id``, ``input_len``, ``output_len`` (and optionally
``prompt_token_ids``).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import numpy as np

__all__ = ["WorkloadSpec", "Request", "adapter_probabilities", "generate_workload", "load_trace", "save_trace",
           "synthetic_adapter_ids", "workload_summary"]


@dataclass
class WorkloadSpec:
    num_adapters: int = 100
    alpha: float = 1.0                  # power-law exponent of adapter popularity
    req_rate: float = 2.0               # R, requests per second
    cv: float = 1.0                     # coefficient of variation of inter-arrival times
    duration: float = 60.0              # seconds of arrivals
    input_range: tuple[int, int] = (8, 512)    # [lo, hi)
    output_range: tuple[int, int] = (8, 512)   # [lo, hi)
    seed: int = 42
    max_requests: int | None = None
    # prompt token ids are drawn from [token_low, vocab_size): the default stays inside the byte
    # range every Llama-family vocabulary (and the demo model's) has
    vocab_size: int = 256
    token_low: int = 3

    def validate(self) -> None:
        if self.num_adapters < 0:
            raise ValueError("num_adapters must be >= 0")
        if self.alpha <= 0:
            raise ValueError("alpha must be > 0")
        if self.req_rate <= 0:
            raise ValueError("req_rate must be > 0")
        if self.cv <= 0:
            raise ValueError("cv must be > 0")
        if self.duration <= 0:
            raise ValueError("duration must be > 0")
        for name, (lo, hi) in (("input_range", self.input_range), ("output_range", self.output_range)):
            if not (1 <= lo < hi):
                raise ValueError(f"{name} must satisfy 1 <= lo < hi, got [{lo}, {hi})")
        if not (0 <= self.token_low < self.vocab_size):
            raise ValueError("token ids need 0 <= token_low < vocab_size")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_range"], d["output_range"] = list(self.input_range), list(self.output_range)
        return d


@dataclass
class Request:
    index: int
    timestamp: float                    # seconds after the start of the run
    adapter_id: str                     # "" for the base model
    input_len: int
    output_len: int
    adapter_index: int = -1
    prompt_token_ids: list[int] = field(default_factory=list, repr=False)

    def to_dict(self, with_prompt: bool = False) -> dict:
        d = {"timestamp": round(self.timestamp, 6), "adapter_id": self.adapter_id,
             "input_len": self.input_len, "output_len": self.output_len}
        if with_prompt:
            d["prompt_token_ids"] = list(self.prompt_token_ids)
        return d


def synthetic_adapter_ids(n: int) -> list[str]:
    """The ids ``loraserve bench --synthetic`` registers: bench-00000, bench-00001, ..."""
    return [f"bench-{i:05d}" for i in range(n)]


def adapter_probabilities(n: int, alpha: float) -> np.ndarray:
    """P(adapter i) for i in 0..n-1 under S-LoRA's power law (see the module docstring)."""
    if n <= 0:
        return np.zeros(0)
    edges = (np.arange(n + 1, dtype=np.float64) / n) ** alpha
    return np.diff(edges)


def generate_workload(spec: WorkloadSpec, adapter_ids: Sequence[str] | None = None) -> list[Request]:
    """The request list of ``spec``. ``adapter_ids[i]`` names adapter ``i``; with no adapters
    (``num_adapters == 0`` or ``adapter_ids == [""]``) every request targets the base model."""
    spec.validate()
    rng = np.random.RandomState(spec.seed)
    n = spec.num_adapters
    if adapter_ids is None:
        adapter_ids = synthetic_adapter_ids(n) if n > 0 else [""]
    adapter_ids = list(adapter_ids)
    if n > 0 and len(adapter_ids) < n:
        raise ValueError(f"need {n} adapter ids, got {len(adapter_ids)}")
    drawn = max(int(spec.req_rate * spec.duration), 0)
    total = drawn if spec.max_requests is None else max(min(drawn, int(spec.max_requests)), 0)
    # S-LoRA's draws, in its order and for all its requests (so the first `total` are its
    # trace's). The adapter draw happens for n = 0 too, so a base-only run gets the same
    # arrivals, lengths and prompts as any n.
    u = rng.power(spec.alpha, drawn)[:total]
    idx = np.minimum((u * n).astype(np.int64), n - 1) if n > 0 else np.zeros(total, dtype=np.int64)
    in_lens = rng.randint(spec.input_range[0], spec.input_range[1], drawn)[:total]
    out_lens = rng.randint(spec.output_range[0], spec.output_range[1], drawn)[:total]
    shape = 1.0 / (spec.cv * spec.cv)
    scale = spec.cv * spec.cv / spec.req_rate
    times = np.cumsum(rng.gamma(shape, scale, drawn)[:total])
    reqs = []
    for i in range(total):
        prompt = rng.randint(spec.token_low, spec.vocab_size, int(in_lens[i])).tolist()
        aid = adapter_ids[int(idx[i])] if n > 0 else adapter_ids[0] if adapter_ids else ""
        reqs.append(Request(index=i, timestamp=float(times[i]), adapter_id=aid, input_len=int(in_lens[i]),
                            output_len=int(out_lens[i]), adapter_index=int(idx[i]) if n > 0 else -1,
                            prompt_token_ids=prompt))
    return reqs


def with_adapters(requests: Iterable[Request], adapter_ids: Sequence[str]) -> list[Request]:
    """The same requests (times, lengths, prompts) retargeted: request with adapter index ``i``
    gets ``adapter_ids[i]``; ``adapter_ids == [""]`` sends everything to the base model."""
    out = []
    for r in requests:
        if len(adapter_ids) == 1:
            aid = adapter_ids[0]
        else:
            aid = adapter_ids[r.adapter_index] if r.adapter_index >= 0 else r.adapter_id
        out.append(Request(r.index, r.timestamp, aid, r.input_len, r.output_len, r.adapter_index,
                           r.prompt_token_ids))
    return out


def save_trace(path: str | os.PathLike, requests: Iterable[Request], with_prompt: bool = False) -> None:
    with open(path, "w") as f:
        for r in requests:
            f.write(json.dumps(r.to_dict(with_prompt)) + "\n")


def load_trace(path: str | os.PathLike, *, seed: int = 42, vocab_size: int = 256, token_low: int = 3,
               time_scale: float = 1.0, max_requests: int | None = None) -> list[Request]:
    """Replay a JSONL trace (``timestamp``, ``adapter_id``, ``input_len``, ``output_len``; optional
    ``prompt_token_ids``). Lines are sorted by timestamp, times shifted to start at the first one's
    offset as written and multiplied by ``time_scale``. Missing prompts are drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                d = json.loads(line)
                rows.append((float(d["timestamp"]), str(d.get("adapter_id") or ""), int(d["input_len"]),
                             int(d["output_len"]), d.get("prompt_token_ids")))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: bad trace line ({e!r}); need timestamp, adapter_id, "
                                 f"input_len, output_len") from None
    rows.sort(key=lambda r: r[0])
    if max_requests is not None:
        rows = rows[:max_requests]
    ids = sorted({r[1] for r in rows})
    index = {a: i for i, a in enumerate(ids)}
    out = []
    for i, (t, aid, il, ol, prompt) in enumerate(rows):
        if il < 1 or ol < 1:
            raise ValueError(f"{path}: request {i}: input_len and output_len must be >= 1")
        if prompt is None:
            prompt = rng.integers(token_low, vocab_size, il).tolist()
        out.append(Request(i, t * time_scale, aid, il, ol, index[aid], list(map(int, prompt))))
    return out


def workload_summary(requests: Sequence[Request]) -> dict:
    """Empirical statistics of a workload (for reports and tests)."""
    if not requests:
        return {"num_requests": 0}
    t = np.array([r.timestamp for r in requests])
    gaps = np.diff(np.concatenate([[0.0], t]))
    mean_gap = float(gaps.mean())
    return {
        "num_requests": len(requests),
        "span_s": float(t[-1]),
        "rate": len(requests) / float(t[-1]) if t[-1] > 0 else math.inf,
        "cv": float(gaps.std() / mean_gap) if mean_gap > 0 else 0.0,
        "num_adapters_used": len({r.adapter_id for r in requests}),
        "avg_input_len": float(np.mean([r.input_len for r in requests])),
        "avg_output_len": float(np.mean([r.output_len for r in requests])),
    }
