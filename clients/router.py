"""Route each request to an engine that already holds its adapter.

Past one GPU, several engines share one adapter store. Each engine heartbeats to the store's
Redis what it is and what its pool holds (``server/store_link.py``); ``AdapterStore/ListEngines``
reads that back. ``Router`` keeps that list (refreshed every ``refresh_s``) and picks, per
request:

1. an engine whose pool already holds the adapter, the least loaded of them: no cold load;
   unless every holder is busier than the least loaded engine by more than ``slack`` requests:
   then the least loaded engine, which loads it too (a hot adapter spreads);
2. else the engine that rendezvous hashing assigns to the adapter, unless it is busier than the
   least loaded engine by more than ``slack`` requests: requests for one cold adapter then
   gather on one engine, which loads it once, instead of every engine loading it;
3. the base model (no adapter): the least loaded engine.

Load is the engine's running + waiting requests at its last heartbeat, or the streams this
router has open to it where those are more (a heartbeat lags the requests just sent). An engine that answers UNAVAILABLE before its stream started is
skipped for ``down_s`` seconds (if its health check fails too: an engine whose store is
unreachable answers UNAVAILABLE for a cold adapter and is otherwise fine) and the request goes to
the next choice. While the store (or its Redis) is unreachable, the last list it gave still routes.
"""
from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import grpc

from clients.client import Client, Completion, GenerateChunk, LoraServeError, Unavailable, _Joiner
from clients.pb import loraserve_pb2 as pb


@dataclass
class EngineView:
    """One live engine as its last heartbeat described it."""
    engine_id: str
    address: str
    base_model: str
    running: int
    waiting: int
    resident: frozenset[str] = field(default_factory=frozenset)
    heartbeat_age_s: float = 0.0

    @classmethod
    def from_pb(cls, e: pb.EngineInfo) -> "EngineView":
        return cls(e.engine_id, e.address, e.base_model, e.running, e.waiting, frozenset(e.resident_adapter_ids),
                   e.heartbeat_age_s)


def _hrw(adapter_id: str, engine_id: str) -> int:
    """Rendezvous (highest random weight) score: every router ranks engines alike for an
    adapter, and removing an engine moves only the adapters it ranked first."""
    return int.from_bytes(hashlib.blake2b(f"{adapter_id}\0{engine_id}".encode(), digest_size=8).digest(), "big")


def choose(engines: Sequence[EngineView], adapter_id: str, extra_load: dict[str, int] | None = None,
           slack: int = 8) -> list[EngineView]:
    """Engines in the order to try for a request of ``adapter_id`` ("" : the base model).
    extra_load: streams the caller has open per engine_id."""
    extra = extra_load or {}
    load = {e.engine_id: max(e.running + e.waiting, extra.get(e.engine_id, 0)) for e in engines}
    by_load = sorted(engines, key=lambda e: (load[e.engine_id], -_hrw(adapter_id, e.engine_id)))
    if not adapter_id or not by_load:
        return by_load
    least = load[by_load[0].engine_id]
    holders = [e for e in by_load if adapter_id in e.resident]
    if holders and load[holders[0].engine_id] <= least + slack:
        return holders + [e for e in by_load if adapter_id not in e.resident]
    if holders:                   # every holder is far busier: the least loaded engine loads it too
        return by_load
    ranked = sorted(engines, key=lambda e: -_hrw(adapter_id, e.engine_id))
    first = next(e for e in ranked if load[e.engine_id] <= least + slack)
    return [first] + [e for e in by_load if e is not first]


class Router:
    """Generate through whichever engine should serve each request (see the module docstring).

    ``store_target``: an adapter store (``loraserve store``, or any ``loraserve serve`` with its
    embedded store) whose Redis the engines heartbeat to. ``base_model``: only engines of this
    model ("" : any). Other keyword arguments go to each ``Client`` (token, timeout, retry)."""

    def __init__(self, store_target: str, *, base_model: str = "", refresh_s: float = 2.0, slack: int = 8,
                 down_s: float = 5.0, **client_kw):
        self.store = Client(store_target, **client_kw)
        self.base_model, self.refresh_s, self.slack, self.down_s = base_model, refresh_s, slack, down_s
        self._client_kw = client_kw
        self._lock = threading.Lock()
        self._engines: list[EngineView] = []
        self._fetched_at = -1e9
        self._clients: dict[str, Client] = {}
        self._open: dict[str, int] = {}       # streams this router has open, per engine
        self._down: dict[str, float] = {}     # engine_id -> skip until (monotonic)

    def engines(self, refresh: bool = False) -> list[EngineView]:
        """Live engines (cached for refresh_s)."""
        with self._lock:
            fresh = time.monotonic() - self._fetched_at < self.refresh_s
            if fresh and not refresh:
                return list(self._engines)
        try:
            views = [EngineView.from_pb(e) for e in self.store.list_engines(base_model=self.base_model)]
        except LoraServeError:
            with self._lock:
                if self._engines:         # the store is down: its last list still routes
                    return list(self._engines)
            raise
        with self._lock:
            self._engines, self._fetched_at = views, time.monotonic()
            return list(views)

    def plan(self, adapter_id: str = "") -> list[EngineView]:
        """The engines to try, in order, for one request."""
        engines = self.engines()
        if not engines:
            engines = self.engines(refresh=True)
        now = time.monotonic()
        with self._lock:
            up = [e for e in engines if self._down.get(e.engine_id, 0) <= now]
            extra = dict(self._open)
        if not engines:
            raise Unavailable(f"no engine heartbeats to the store at {self.store.target}"
                              + (f" for base model {self.base_model!r}" if self.base_model else ""))
        return choose(up or engines, adapter_id, extra, self.slack)

    def _healthy(self, address: str) -> bool:
        try:
            return self._client(address).health(timeout=1.0) == "SERVING"
        except LoraServeError:
            return False

    def _client(self, address: str) -> Client:
        with self._lock:
            c = self._clients.get(address)
            if c is None:
                c = self._clients[address] = Client(address, **self._client_kw)
            return c

    def generate(self, prompt: str | Sequence[int] | None = None, *, adapter_id: str = "",
                 **kw) -> Iterator[GenerateChunk]:
        """``Client.generate`` on the chosen engine; each chunk's ``engine`` names it."""
        last: LoraServeError | None = None
        for engine in self.plan(adapter_id):
            started = False
            with self._lock:
                self._open[engine.engine_id] = self._open.get(engine.engine_id, 0) + 1
            try:
                for chunk in self._client(engine.address).generate(prompt, adapter_id=adapter_id, **kw):
                    started = True
                    chunk.engine = engine.address
                    yield chunk
                return
            except LoraServeError as e:
                if started or e.code != grpc.StatusCode.UNAVAILABLE:
                    raise
                last = e
                if not self._healthy(engine.address):
                    with self._lock:
                        self._down[engine.engine_id] = time.monotonic() + self.down_s
            finally:
                with self._lock:
                    self._open[engine.engine_id] -= 1
        raise last or Unavailable("no engine to try")

    def complete(self, prompt: str | Sequence[int] | None = None, **kw) -> Completion:
        """The whole generation (``Client.complete``), through the chosen engine."""
        j = _Joiner()
        for c in self.generate(prompt, **kw):
            j.add(c)
        return j.result()

    def close(self) -> None:
        self.store.close()
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            c.close()

    def __enter__(self) -> "Router":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
