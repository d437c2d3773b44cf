"""Adapter residency: GPU pool (hot) <- host memory cache (warm) <- adapter source (cold).

Cold misses are fetched on a thread pool so the engine keeps stepping; the staged page images
land in a host cache that is LRU by bytes (pinned on CUDA), and a warm adapter enters the pool
with one copy on a side stream. Resident adapters are reference-counted by running requests and
evicted LRU only when their pages are needed.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
from dataclasses import dataclass, field
from typing import Protocol

import torch

from server.lora import AdapterError, LoraWeights, parse_adapter
from server.pool import AdapterTable, PoolExhausted, StagedAdapter, UnifiedPool, stage_adapter

log = logging.getLogger("loraserve.adapters")


class AdapterNotFound(LookupError):
    pass


class SourceUnavailable(RuntimeError):
    pass


def fetch_failure(adapter_id: str, err: Exception) -> tuple[str, str]:
    """(grpc status name, message) for a request whose adapter's fetch failed with err."""
    if isinstance(err, AdapterNotFound):
        return "NOT_FOUND", f"adapter {adapter_id!r} is not registered"
    if isinstance(err, AdapterError):
        return "INVALID_ARGUMENT", f"adapter {adapter_id!r} cannot be served: {err}"
    return "UNAVAILABLE", f"adapter {adapter_id!r} could not be fetched: {err}"


class AdapterSource(Protocol):
    def exists(self, adapter_id: str) -> bool: ...
    def fetch(self, adapter_id: str) -> tuple[int, bytes, bytes]:
        """(version, adapter_config.json bytes, adapter_model.safetensors bytes)."""


class LocalSource:
    """Adapters from local PEFT folders (`--adapter NAME=DIR`)."""

    def __init__(self, dirs: dict[str, str] | None = None):
        self.dirs = dict(dirs or {})

    def exists(self, adapter_id: str) -> bool:
        return adapter_id in self.dirs

    def fetch(self, adapter_id: str) -> tuple[int, bytes, bytes]:
        import pathlib

        if adapter_id not in self.dirs:
            raise AdapterNotFound(adapter_id)
        p = pathlib.Path(self.dirs[adapter_id])
        return 0, (p / "adapter_config.json").read_bytes(), (p / "adapter_model.safetensors").read_bytes()


class ChainSource:
    """Try each source in order (local folders first, then the adapter store)."""

    def __init__(self, *sources):
        self.sources = [s for s in sources if s is not None]

    def exists(self, adapter_id: str) -> bool:
        return any(s.exists(adapter_id) for s in self.sources)

    def fetch(self, adapter_id: str) -> tuple[int, bytes, bytes]:
        for s in self.sources:
            if s.exists(adapter_id):
                return s.fetch(adapter_id)
        raise AdapterNotFound(adapter_id)


@dataclass
class Resident:
    adapter_id: str
    version: int
    slot: int
    pages: int
    refs: int = 0
    stale: bool = False   # replaced or deleted: finish running requests, admit none
    copied: object = None  # torch.cuda.Event of its page copy until a step has waited on it


@dataclass
class Fetch:
    error: Exception | None = None


class AdapterManager:
    def __init__(self, pool: UnifiedPool, table: AdapterTable, source: AdapterSource,
                 model_cfg, host_cache_bytes: int = 8 << 30, fetch_workers: int = 4, tp=None,
                 fetch_processes: int = 0):
        """model_cfg: the whole model's config (adapters are validated against it, then sharded
        for this tensor-parallel rank)."""
        from server.tp import TP
        self.pool, self.table, self.source, self.model_cfg = pool, table, source, model_cfg
        self.tp = tp or TP()
        self.cuda = pool.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(pool.device) if self.cuda else None
        self.host_cache_bytes = host_cache_bytes
        self._lock = threading.Lock()
        self._host: collections.OrderedDict[str, tuple[int, StagedAdapter]] = collections.OrderedDict()
        self._host_bytes = 0
        self._fetches: dict[str, Fetch] = {}
        # bumped by unload (a delete or replace): a fetch that started before must not put the
        # version it read into the host cache when it lands
        self._unloads: collections.Counter[str] = collections.Counter()
        self._pool_ex = concurrent.futures.ThreadPoolExecutor(fetch_workers, thread_name_prefix="adapter-fetch")
        # Cold fetches parse, validate and stage ~100 MB in Python-driven steps; in one process the
        # GIL serializes them (~150 MB/s whatever the thread count). Worker processes do that
        # work in parallel and hand back the page images through shared memory.
        self._procs = None
        if fetch_processes > 0:
            import multiprocessing as mp
            self._procs = concurrent.futures.ProcessPoolExecutor(fetch_processes, mp_context=mp.get_context("spawn"),
                                                                 initializer=_init_fetch_process)
        # engine-thread state
        self.resident: collections.OrderedDict[str, Resident] = collections.OrderedDict()  # LRU order
        self.stale: list[Resident] = []
        self.loads = 0
        self.preloads = 0      # loads started ahead of admission (counted in loads too)
        self.evictions = 0     # idle adapters dropped from the pool to make room

    # -- host side (any thread) ------------------------------------------------------------
    def prefetch(self, adapter_id: str) -> None:
        """Start fetching a cold adapter into the host cache (no-op when warm, hot or on its way).
        A failed fetch that nobody collected (its requests were cancelled) is fetched again: a
        new request must not inherit an old error."""
        with self._lock:
            if adapter_id in self._host:
                return
            f = self._fetches.get(adapter_id)
            if f is not None and f.error is None:
                return
            if adapter_id in self.resident and not self.resident[adapter_id].stale:
                return
            fetch = self._fetches[adapter_id] = Fetch()
            self._pool_ex.submit(self._fetch, adapter_id, fetch, self._unloads[adapter_id])

    def _fetch(self, adapter_id: str, fetch: Fetch, unloads: int) -> None:
        try:
            if self._procs is not None:
                version, staged = self._procs.submit(
                    fetch_and_stage, adapter_id, self.source, self.model_cfg, self.tp,
                    self.pool.block_tokens, self.pool.dtype, self.pool.adapter_dtype).result()
                if self.cuda:
                    staged.images = staged.images.pin_memory()
            else:
                version, cfg_bytes, w_bytes = self.source.fetch(adapter_id)
                staged = self._stage(parse_adapter(adapter_id, cfg_bytes, w_bytes, self.model_cfg, self.pool.dtype))
            with self._lock:
                if self._fetches.get(adapter_id) is fetch:
                    del self._fetches[adapter_id]
                if self._unloads[adapter_id] != unloads:   # deleted or replaced meanwhile
                    log.info("adapter %s changed during its fetch: dropping version %d", adapter_id, version)
                    return                                  # a waiting request fetches it again
                self._put_host(adapter_id, version, staged)
        except Exception as e:  # recorded for the scheduler to fail the waiting requests
            log.warning("fetch of adapter %s failed: %s", adapter_id, e)
            with self._lock:
                fetch.error = e

    def put_host(self, adapter_id: str, version: int, staged: StagedAdapter) -> None:
        with self._lock:
            self._put_host(adapter_id, version, staged)

    def _put_host(self, adapter_id: str, version: int, staged: StagedAdapter) -> None:
        """With the lock held: cache it, and drop the least recently used past the byte budget."""
        old = self._host.pop(adapter_id, None)
        if old:
            self._host_bytes -= old[1].host_bytes
        self._host[adapter_id] = (version, staged)
        self._host_bytes += staged.host_bytes
        while self._host_bytes > self.host_cache_bytes and len(self._host) > 1:
            _, (_, ev) = self._host.popitem(last=False)
            self._host_bytes -= ev.host_bytes

    def add_weights(self, weights: LoraWeights, version: int = 0) -> None:
        """Stage parsed weights (validated against the whole model) into the host cache."""
        self.put_host(weights.adapter_id, version, self._stage(weights))

    def _stage(self, weights: LoraWeights) -> StagedAdapter:
        """This rank's shard of the weights as page images (pinned on CUDA)."""
        from server.tp import shard_lora
        return stage_adapter(shard_lora(weights, self.model_cfg, self.tp), self.pool, pin=self.cuda)

    def has_failed(self, adapter_id: str) -> bool:
        with self._lock:
            f = self._fetches.get(adapter_id)
            return f is not None and f.error is not None

    def readiness(self, adapter_id: str) -> int:
        """1: in the pool or the host cache; 0: on its way; -1: its fetch failed (fetch_error
        says why). An adapter that is none of these is fetched again: the host cache can drop
        a waiting request's adapter for newer ones, and a delete or replace (unload) drops it on
        purpose; the request then gets the new version, or NOT_FOUND, instead of waiting forever."""
        if self.ready(adapter_id):
            return 1
        with self._lock:
            f = self._fetches.get(adapter_id)
            if f is not None:
                return -1 if f.error is not None else 0
        self.prefetch(adapter_id)
        return 0

    def fetch_error(self, adapter_id: str) -> Exception | None:
        with self._lock:
            f = self._fetches.get(adapter_id)
            if f and f.error is not None:
                del self._fetches[adapter_id]
                return f.error
            return None

    def versions(self) -> dict[str, int]:
        """(engine thread) The version of every adapter held, in the pool or the host cache."""
        with self._lock:
            held = {aid: version for aid, (version, _) in self._host.items()}
        held.update((aid, r.version) for aid, r in self.resident.items() if not r.stale)
        return held

    def cached_ids(self) -> list[str]:
        with self._lock:
            return list(self._host)

    def is_known_locally(self, adapter_id: str) -> bool:
        with self._lock:
            if adapter_id in self._host:
                return True
        r = self.resident.get(adapter_id)
        return r is not None and not r.stale

    # -- pool side (engine thread) ---------------------------------------------------------
    def ready(self, adapter_id: str) -> bool:
        r = self.resident.get(adapter_id)
        if r is not None and not r.stale:
            return True
        with self._lock:
            return adapter_id in self._host

    def pages_to_load(self, adapter_id: str) -> int:
        """Pages the adapter still needs in the pool (0 when resident)."""
        r = self.resident.get(adapter_id)
        if r is not None and not r.stale:
            return 0
        with self._lock:
            return self._host[adapter_id][1].num_pages

    def _load(self, adapter_id: str) -> Resident:
        """Copy an adapter from the host cache into the pool (side stream on CUDA)."""
        r = self.resident.get(adapter_id)
        if r is not None:          # a stale copy still serves its running requests
            self.stale.append(self.resident.pop(adapter_id))
        with self._lock:
            version, staged = self._host[adapter_id]
            self._host.move_to_end(adapter_id)
        self.make_room(staged.num_pages)
        if self.table.full:
            self._evict_one()
        entry = self.table.insert(staged, self.copy_stream)
        r = Resident(adapter_id, version, entry.slot, staged.num_pages, copied=entry.copied)
        self.resident[adapter_id] = r
        self.loads += 1
        return r

    def pages_to_load_or_zero(self, adapter_id: str) -> int:
        """pages_to_load, or 0 where the host cache does not hold it (yet)."""
        try:
            return self.pages_to_load(adapter_id)
        except KeyError:
            return 0

    def acquire(self, adapter_id: str) -> int:
        """Pin an adapter in the pool for a request; loads it from the host cache if needed."""
        r = self.resident.get(adapter_id)
        if r is None or r.stale:
            r = self._load(adapter_id)
        if r.copied is not None:
            # the next step reads it: it waits for the page copy (long done if it was preloaded);
            # work already queued does not
            torch.cuda.current_stream(self.pool.device).wait_event(r.copied)
            r.copied = None
        r.refs += 1
        self.resident.move_to_end(adapter_id)
        return r.slot

    def preload(self, adapter_id: str, reserve: int) -> int:
        """Start copying a waiting request's adapter into the pool before it is admitted, so the
        copy overlaps the steps in between instead of stalling the step that admits it (S-LoRA
        prefetches the next batch's adapters the same way). Only into free pages beyond the
        ``reserve`` kept free, and a free slot: it never evicts. Returns the pages it took."""
        if self.tp.enabled or self.table.full:   # (under TP every rank must load alike)
            return 0
        r = self.resident.get(adapter_id)
        if r is not None and not r.stale:
            return 0
        with self._lock:
            hit = self._host.get(adapter_id)
        if hit is None or self.pool.free_pages - hit[1].num_pages < reserve:
            return 0
        try:
            self._load(adapter_id)
        except KeyError:        # a fetch landing meanwhile pushed it out of the host cache
            return 0
        self.preloads += 1
        return hit[1].num_pages

    def held(self, adapter_id: str, slot: int) -> Resident:
        """The copy (current or replaced) of an adapter that a request holds by its slot."""
        r = self.resident.get(adapter_id)
        if r is not None and r.slot == slot:
            return r
        return next(s for s in self.stale if s.slot == slot)

    def release(self, adapter_id: str, slot: int) -> None:
        r = self.resident.get(adapter_id)
        if r is not None and r.slot == slot:
            r.refs -= 1
            if r.stale and r.refs == 0:
                self._drop(r)
                del self.resident[adapter_id]
            return
        for s in self.stale:
            if s.slot == slot:
                s.refs -= 1
                if s.refs == 0:
                    self._drop(s)
                    self.stale.remove(s)
                return

    def _drop(self, r: Resident) -> None:
        """Free an adapter's slot and pages; pages whose copy may still run are reused only after it."""
        if r.copied is not None:
            torch.cuda.current_stream(self.pool.device).wait_event(r.copied)
            r.copied = None
        self.table.remove(r.slot)

    def make_room(self, pages: int) -> None:
        while self.pool.free_pages < pages:
            if not self._evict_one():
                raise PoolExhausted(f"need {pages} pages for an adapter, {self.pool.free_pages} free")

    def _evict_one(self) -> bool:
        for aid, r in self.resident.items():   # LRU first
            if r.refs == 0:
                self._drop(r)
                del self.resident[aid]
                self.evictions += 1
                return True
        return False

    def unload(self, adapter_id: str, drop_host: bool = True) -> bool:
        """Drop an adapter from the pool (now if idle, else when its requests finish); with
        drop_host (a delete or replace) also from the host cache, and a fetch still running
        lands nowhere."""
        found = False
        if drop_host:
            with self._lock:
                old = self._host.pop(adapter_id, None)
                if old:
                    self._host_bytes -= old[1].host_bytes
                    found = True
                self._unloads[adapter_id] += 1
                self._fetches.pop(adapter_id, None)   # its result, or its error, is of the old version
        r = self.resident.get(adapter_id)
        if r is not None:
            found = True
            if r.refs == 0:
                self._drop(r)
                del self.resident[adapter_id]
            else:
                r.stale = True
        return found

    def close(self) -> None:
        self._pool_ex.shutdown(wait=False, cancel_futures=True)
        if self._procs is not None:
            self._procs.shutdown(wait=False, cancel_futures=True)


def fetch_and_stage(adapter_id: str, source: AdapterSource, model_cfg, tp, block_tokens: int,
                    dtype: torch.dtype, adapter_dtype: torch.dtype | None = None) -> tuple[int, StagedAdapter]:
    """In a fetch worker process: fetch, validate against the whole model, shard for this TP rank,
    and lay out as page images in shared memory (the engine process maps them without a copy)."""
    from server.tp import shard_config, shard_lora

    version, cfg_bytes, w_bytes = source.fetch(adapter_id)
    weights = parse_adapter(adapter_id, cfg_bytes, w_bytes, model_cfg, dtype)
    weights = shard_lora(weights, model_cfg, tp)
    key = (repr(model_cfg), tp.rank, tp.world, block_tokens, str(dtype), str(adapter_dtype))
    layout = _layouts.get(key)
    if layout is None:   # a one-page pool: only its shapes and page size are used
        layout = _layouts[key] = UnifiedPool(shard_config(model_cfg, tp), 2, block_tokens, dtype, "cpu",
                                             adapter_dtype)
    staged = stage_adapter(weights, layout)
    staged.images.share_memory_()
    if staged.row_scale is not None:
        staged.row_scale.share_memory_()
    return version, staged


_layouts: dict = {}


def _init_fetch_process() -> None:
    # one thread each: N processes x torch's default thread pool would oversubscribe the cores
    torch.set_num_threads(1)
