"""One generation request as the engine tracks it."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Callable


from server.sampler import SamplingParams


class Finish(enum.IntEnum):   # values match proto FinishReason
    LENGTH = 1
    EOS = 2
    STOP = 3
    ABORTED = 4


@dataclass
class Output:
    """What one step produced for one request; delivered to the servicer's stream."""
    token_ids: list[int]
    logprobs: list[float]
    finish: Finish | None = None
    error: tuple[str, str] | None = None   # (grpc status name, message)


@dataclass(frozen=True)
class StreamQueue:
    """A stream's asyncio queue and the event loop that owns it. The engine hands all of a step's
    outputs bound for one loop over in one thread-safe call: one wake-up of that loop per step,
    where a callback per request cost a socket write and a wake-up for every token."""
    loop: Any     # asyncio.AbstractEventLoop
    queue: Any    # asyncio.Queue[Output]


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter_id: str = ""
    emit: Callable[[Output], None] = lambda out: None   # where no stream is set (in-process use)
    stream: StreamQueue | None = None
    arrival: float = field(default_factory=time.monotonic)
    # engine state
    output_ids: list[int] = field(default_factory=list)
    blocks: list[list[int]] = field(default_factory=list)   # per KV block: 2L page ids
    num_computed: int = 0           # tokens whose K/V are in the pool
    slot: int = -1                  # adapter slot it holds (running, or preempted); -1: none
    adapter_version: int = -1       # the version it started on: all its tokens come from that one
    # Sampling seed: params.seed, or (under tensor parallelism) one rank 0 draws so every rank
    # samples alike. Each token's draw is seeded by (seed, its position), not taken from a
    # stateful generator: a token sampled and then voided (preemption, a request that left the
    # batch) must not shift the draws after it, so a seeded request's text does not depend on
    # whether it was preempted or on what else ran.
    seed: int | None = None
    finished: bool = False
    preempted: int = 0
    bt_row: int = -1                # its row in the engine's BlockTables (-1: none yet)
    bt_len: int = 0                 # blocks already written to that row
    # Tokens sampled on the device that the host has not read yet. The engine launches step N+1
    # before it reads step N's tokens, so a running request has one (two, between that launch
    # and the read); step N+1 takes its input token from step N's output on the device.
    inflight: int = 0
    last_row: int = -1              # its row in the latest launched step's output
    epoch: int = 0                  # bumped when it leaves the running set: tokens in flight are void
    # read but not yet handed to the stream (the engine's stream_interval batches them)
    unsent_ids: list[int] = field(default_factory=list)
    unsent_logprobs: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.seed is None:
            self.seed = self.params.seed

    @property
    def all_ids(self) -> list[int]:
        """The tokens the host knows (the in-flight ones are not among them)."""
        return self.prompt_ids + self.output_ids

    @property
    def total_len(self) -> int:
        """Tokens in its sequence, counting those still in flight."""
        return len(self.prompt_ids) + len(self.output_ids) + self.inflight

    @property
    def peak_len(self) -> int:
        """The most tokens this request can ever hold in the KV cache (S-LoRA's peak need)."""
        return len(self.prompt_ids) + self.params.max_new_tokens
