"""Continuous batching with S-LoRA's admission rule, and preemption by recompute.

Each step: decodes of running requests, plus waiting requests admitted first-come-first-served
while (a) the prefill token budget lasts and (b) the peak future KV need of running plus admitted
requests fits the pool's pages minus the pages their adapters hold. Under that rule ("peak")
the pool never runs out mid-step. "optimistic" admission (what fits now) over-commits and relies
on preemption: the newest running request gives back its pages and is recomputed later.

The peak is not the sum of every request's final length: requests finish at different times and
give their pages back, so the most the batch ever holds is reached just before one of them ends
(S-LoRA inherits this bound from lightllm). See ``FuturePeak``.
"""
from __future__ import annotations

import bisect
import collections
import itertools
import logging
from dataclasses import dataclass

from server.adapters import AdapterManager
from server.pool import PoolExhausted, UnifiedPool
from server.request import Request

log = logging.getLogger("loraserve.scheduler")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_prefill_tokens: int = 4096
    max_model_len: int = 4096
    admission: str = "peak"      # or "optimistic"
    # Admit new prefills at most every this many steps while others decode (lightllm's
    # max_wait_tokens, which S-LoRA inherits). A step with a prefill runs eagerly, outside the
    # decode CUDA graphs, so batching admissions makes those costly steps rarer and fuller.
    # A full prefill budget waiting, or an idle engine, admits at once, unless the last admission
    # stopped for want of pages or at max_num_seqs: then each finishing request would get its own
    # eager step.
    prefill_interval: int = 1


@dataclass
class Step:
    prefills: list[Request]
    decodes: list[Request]

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, pool: UnifiedPool, adapters: AdapterManager, agree=None):
        self.cfg, self.pool, self.adapters = cfg, pool, adapters
        # Under tensor parallelism every rank must admit the same requests: `agree` takes the
        # minimum of each waiting request's adapter readiness over the ranks.
        self.agree = agree
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.preemptions = 0
        self.rejected: list[tuple[Request, str, str]] = []   # (request, grpc status, message)
        self._since_admit = 0        # steps since the last one that admitted a prefill
        self._full = False            # the last admission stopped: pool pages or max_num_seqs

    def add(self, req: Request) -> None:
        self.waiting.append(req)
        if req.adapter_id:
            self.adapters.prefetch(req.adapter_id)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- pages -------------------------------------------------------------------------
    def _pages(self, tokens: int) -> int:
        return self.pool.kv_pages_for(tokens)

    def _grow(self, req: Request, tokens: int) -> None:
        """Give req KV blocks for its first `tokens` tokens."""
        need = -(-tokens // self.pool.block_tokens) - len(req.blocks)
        if need > 0:
            per = 2 * self.pool.cfg.num_layers
            if self.pool.free_pages < need * per:
                self.adapters.make_room(need * per)
            pages = self.pool.alloc(need * per, "kv")
            req.blocks += [pages[i * per:(i + 1) * per] for i in range(need)]

    def _last_in_flight(self, req: Request) -> bool:
        """Its last token is already being sampled: it must not decode again."""
        return req.inflight > 0 and (len(req.output_ids) + req.inflight >= req.params.max_new_tokens
                                     or req.total_len >= self.cfg.max_model_len)

    def free(self, req: Request, keep_adapter: bool = False) -> None:
        """Return a request's KV pages and (unless keep_adapter) its adapter reference: finish,
        abort, preempt. Tokens it has in flight are void: a preempted request recomputes from the
        tokens the host knows. A preempted request keeps its adapter: a replace meanwhile must
        not hand it the new version half-way through its output."""
        for b in req.blocks:
            self.pool.free(b, "kv")
        req.blocks = []
        req.bt_len = 0            # the engine rewrites the block table row from scratch
        req.num_computed = 0
        req.inflight = 0
        req.epoch += 1
        if req.slot >= 0 and not keep_adapter:
            self._unpin(req)

    def _unpin(self, req: Request) -> None:
        self.adapters.release(req.adapter_id, req.slot)
        req.slot = -1

    def remove(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.free(req)

    def _preempt(self) -> Request | None:
        """Recompute policy: the newest running request goes back to the front of the queue.
        Returns it (None when nothing runs)."""
        if not self.running:
            return None
        victim = max(self.running, key=lambda r: r.arrival)
        self.running.remove(victim)
        self.free(victim, keep_adapter=True)
        victim.preempted += 1
        self.preemptions += 1
        self.waiting.appendleft(victim)
        log.info("preempted %s (%d tokens)", victim.request_id, victim.total_len)
        return victim

    # -- one step -----------------------------------------------------------------------
    def schedule(self) -> Step:
        # 1. room for every running request's next token; preempt until it fits.
        decodes = []
        preempted: set[int] = set()    # ids: a membership test on the running list per request was O(batch^2)
        for req in list(self.running):
            if id(req) in preempted:
                continue
            if self._last_in_flight(req):
                continue   # it finishes when the host reads that token
            while True:
                try:
                    self._grow(req, req.total_len)
                    decodes.append(req)
                    break
                except PoolExhausted:
                    pinning = [r for r in self.waiting if r.slot >= 0] if self.running == [req] else []
                    if pinning:
                        # alone, but preempted requests hold adapters: they let go (and are
                        # checked for their version when they come back) before this one fails
                        for r in pinning:
                            self._unpin(r)
                        continue
                    if self.running == [req]:
                        # alone, with every idle adapter evicted, and still no room: it can never
                        # finish (optimistic admission let it in on its prompt alone)
                        self.running.remove(req)
                        self.free(req)
                        self.rejected.append((req, "RESOURCE_EXHAUSTED", (
                            f"the request needs more KV pages than the pool holds beside its adapter "
                            f"(it reached {req.total_len} tokens of {self._final_len(req)}); lower "
                            f"max_new_tokens or the prompt length")))
                        break
                    victim = self._preempt()
                    if victim is None:
                        break
                    preempted.add(id(victim))
                    if victim is req:
                        break
        if preempted:   # a victim that had already taken its place in this step gave its pages back
            decodes = [r for r in decodes if id(r) not in preempted]
        # 2. admit waiting requests.
        prefills: list[Request] = []
        self._since_admit += 1
        if not self._admission_due():
            self._preload()
            return Step(prefills, decodes)
        self._full = False
        budget = self.cfg.max_prefill_tokens
        peak = self.cfg.admission == "peak"
        if peak:    # (only a queue needs it: built once per admitting step, not per candidate)
            future = FuturePeak(self.pool.block_tokens, 2 * self.pool.cfg.num_layers,
                                [self._remaining(r) for r in self.running] if self.waiting else [])
        else:
            reserved = sum(self._pages(r.total_len + 1) for r in self.running)
        held = {r.adapter_id for r in self.running if r.adapter_id}
        # pages that admission cannot count on: adapters held by running requests (or pinned),
        # kept up to date as admissions pin more (once per step: a sum over every resident
        # adapter per candidate cost ~0.1 ms per candidate with ~300 resident)
        pinned = {aid for aid, r in self.adapters.resident.items() if aid in held or r.refs > 0}
        capacity = (self.pool.num_pages - sum(self.adapters.resident[aid].pages for aid in pinned)
                    - sum(s.pages for s in self.adapters.stale))     # (old versions still in use)
        skipped = collections.deque()
        readiness = self._readiness()
        while self.waiting and len(self.running) + len(prefills) < self.cfg.max_num_seqs:
            req = self.waiting.popleft()
            if req.adapter_id and req.slot < 0 and readiness[req.adapter_id] < 1:
                err = self.adapters.fetch_error(req.adapter_id) if readiness[req.adapter_id] < 0 else None
                if readiness[req.adapter_id] < 0 and err is None:
                    err = RuntimeError("the fetch failed on another tensor-parallel rank")
                if err is not None:
                    self._reject_adapter(req.adapter_id, err, [req, *skipped])
                    skipped = collections.deque(r for r in skipped if r.adapter_id != req.adapter_id)
                else:
                    skipped.append(req)    # still being fetched: let ready requests go first
                continue
            n = req.total_len
            if n > budget and prefills:     # a prompt over the whole budget runs alone in its step
                self.waiting.appendleft(req)
                break
            try:
                adapter_pages = 0 if req.slot >= 0 else self._adapter_pages(req.adapter_id, pinned)
            except KeyError:           # the host cache evicted it since the readiness check
                self.adapters.prefetch(req.adapter_id)
                skipped.append(req)
                continue
            if req.slot >= 0:     # the version it holds (a replaced one, perhaps)
                own = self.adapters.held(req.adapter_id, req.slot).pages
            else:
                resident = self.adapters.resident.get(req.adapter_id) if req.adapter_id in pinned else None
                own = resident.pages if resident is not None and not resident.stale else adapter_pages
            if self._pages(self._final_len(req)) + own > self.pool.num_pages:
                # it could not finish in an empty pool: refuse it now (optimistic admission would
                # let it in on its prompt and fail it tokens later)
                if req.slot >= 0:
                    self._unpin(req)
                self.rejected.append((req, "RESOURCE_EXHAUSTED", self._too_big(req, own, self.pool.num_pages)))
                continue
            if peak:
                entry = future.add(*self._remaining(req))
                fits = future.pages() + adapter_pages <= capacity
                if not fits:
                    future.remove(entry)
            else:
                fits = reserved + self._pages(n) + adapter_pages <= capacity
            if not fits:
                if not self.running and not prefills:
                    self.rejected.append((req, "RESOURCE_EXHAUSTED", self._too_big(req, adapter_pages, capacity)))
                    continue
                self.waiting.appendleft(req)
                self._full = True
                break
            try:
                if req.adapter_id and req.slot < 0:
                    before = self.adapters.resident.get(req.adapter_id)
                    try:
                        req.slot = self.adapters.acquire(req.adapter_id)
                    except KeyError:      # a fetch landing meanwhile pushed it out of the host cache
                        self.adapters.prefetch(req.adapter_id)
                        if peak:
                            future.remove(entry)
                        skipped.append(req)
                        continue
                    held.add(req.adapter_id)
                    now = self.adapters.resident[req.adapter_id]
                    if req.adapter_id not in pinned or now is not before:   # (a new version loaded)
                        pinned.add(req.adapter_id)
                        capacity -= now.pages
                    if not self._same_version(req):
                        if peak:
                            future.remove(entry)
                        continue
                self._grow(req, n)
            except PoolExhausted:
                self.free(req, keep_adapter=True)
                self.waiting.appendleft(req)
                self._full = True
                break
            if not peak:
                reserved += self._pages(n)
            budget -= n
            prefills.append(req)
        if self.waiting and len(self.running) + len(prefills) >= self.cfg.max_num_seqs:
            self._full = True
        self.waiting.extendleft(reversed(skipped))
        self.running += prefills
        if prefills or self._full:   # a full engine also restarts the interval: see _admission_due
            self._since_admit = 0
        self._preload()
        return Step(prefills, decodes)

    def _same_version(self, req: Request) -> bool:
        """Record the adapter version a request starts on; a request that let its adapter go
        (preempted, then unpinned) and finds another version now is failed, not continued on it."""
        version = self.adapters.resident[req.adapter_id].version
        if req.adapter_version < 0 or req.adapter_version == version or not req.output_ids:
            req.adapter_version = version
            return True
        self._unpin(req)
        self.rejected.append((req, "ABORTED", (
            f"adapter {req.adapter_id!r} was replaced while this request was preempted: its output so far "
            f"came from version {req.adapter_version}, and that version is gone; send the request again")))
        return False

    def _adapter_pages(self, adapter_id: str, pinned: set[str]) -> int:
        """Pages admitting a request for this adapter takes from what admission counts on: none
        for the base model or an adapter already pinned (capacity excludes its pages); an idle
        resident adapter's pages, which it pins; else its host copy's (KeyError: not cached)."""
        if not adapter_id:
            return 0
        r = self.adapters.resident.get(adapter_id)
        if r is not None and not r.stale:
            return 0 if adapter_id in pinned else r.pages
        # not resident, or only a replaced version still in use (pinned, yet the request gets the
        # new one): the new version's host copy (KeyError: not in the host cache)
        return self.adapters.pages_to_load(adapter_id)

    def _too_big(self, req: Request, adapter_pages: int, capacity: int) -> str:
        """Why a request that runs alone still does not fit, and what would make it fit."""
        kv = self._pages(self._final_len(req))
        if adapter_pages + self._pages(req.total_len + 1) > capacity:
            return (f"adapter {req.adapter_id!r} takes {adapter_pages} of the {capacity} pages this pool can give "
                    f"it, which leaves too few for the prompt's KV cache: this server cannot serve it (a larger "
                    f"pool: --pool-mb or --gpu-memory-utilization; or an adapter of smaller rank)")
        return (f"the request needs {kv + adapter_pages} pages ({kv} of KV cache at its longest"
                + (f", {adapter_pages} for its adapter" if adapter_pages else "")
                + f") but the pool can hold {capacity}; lower max_new_tokens or the prompt length")

    def _final_len(self, req: Request) -> int:
        return min(req.peak_len, self.cfg.max_model_len)

    def _remaining(self, req: Request) -> tuple[int, int]:
        """(tokens it may still add, tokens it holds now)."""
        return max(self._final_len(req) - req.total_len, 0), req.total_len

    def _preload(self, lookahead: int = 16) -> None:
        """Copy the adapters of the next waiting requests into free pool pages now, so their
        copies overlap the coming steps rather than stall the step that admits them.

        Preloaded adapters are idle (no references): when running requests grow into those pages
        later, the pool evicts them like any idle adapter, so only a margin stays free here: a
        block for each running request and the prompts of the requests ahead in the queue."""
        reserve = len(self.running) * 2 * self.pool.cfg.num_layers
        for req in itertools.islice(self.waiting, lookahead):
            reserve += self._pages(req.total_len + 1)
            if req.adapter_id and req.slot < 0 and self.adapters.pages_to_load_or_zero(req.adapter_id):
                if not self.adapters.preload(req.adapter_id, reserve):
                    return     # no room: later requests must not take what this one needs

    def _admission_due(self) -> bool:
        if self.cfg.prefill_interval <= 1 or not self.running or self._since_admit >= self.cfg.prefill_interval:
            return True
        if self._full:     # room frees up a request at a time: wait for the interval's worth
            return False
        waiting_tokens = 0
        for r in self.waiting:
            waiting_tokens += r.total_len
            if waiting_tokens >= self.cfg.max_prefill_tokens:
                return True
        return False

    def _readiness(self) -> dict[str, int]:
        """Per waiting adapter: 1 ready, 0 still fetching, -1 fetch failed (agreed over ranks).

        Under tensor parallelism every waiting adapter is agreed on at once (one collective);
        otherwise each is looked up when admission reaches it: with a queue of hundreds of
        requests over as many adapters, checking them all cost ~0.5 ms a step for the few
        that one step admits."""
        if self.agree is None:
            return _Readiness(self.adapters)
        ids = sorted({r.adapter_id for r in self.waiting if r.adapter_id and r.slot < 0})
        return dict(zip(ids, self.agree([self.adapters.readiness(aid) for aid in ids])))

    def _reject_adapter(self, adapter_id: str, err: Exception, candidates) -> None:
        """Fail every queued request for an adapter whose fetch failed."""
        from server.adapters import fetch_failure

        status, msg = fetch_failure(adapter_id, err)
        doomed = [r for r in [*candidates, *self.waiting] if r.adapter_id == adapter_id and r.slot < 0]
        for r in doomed:
            if r in self.waiting:
                self.waiting.remove(r)
            self.rejected.append((r, status, msg))


class _Readiness(dict):
    """Readiness codes looked up on first use and kept for the step."""

    def __init__(self, adapters: AdapterManager):
        super().__init__()
        self.adapters = adapters

    def __missing__(self, adapter_id: str) -> int:
        code = self[adapter_id] = self.adapters.readiness(adapter_id)
        return code


class FuturePeak:
    """The most KV pages a set of requests will ever hold at once, if each runs to its limit.

    Request j holds c_j tokens and may add up to r_j more, one per step; it gives its pages back
    when it ends. The total only grows between endings, so its maximum comes just before one:
    at step r_i, the requests with r_j >= r_i hold sum(ceil((c_j + r_i) / B)) blocks. Sorted by
    r descending, that is a prefix. Two bounds of the prefix sum, each never below the truth,
    and the smaller is taken: (sum(c_j) + i (r_i + B - 1)) // B, loose by up to a block per
    request; and the sum of the requests' final blocks ceil((c_j + r_j) / B), exact when they
    all end together. Admitting against this never over-commits, yet lets in the requests that
    summing every final length (the second bound alone) would turn away.
    """

    def __init__(self, block_tokens: int, pages_per_block: int, requests: list[tuple[int, int]] = ()):
        """requests: (remaining, holding) pairs to start from."""
        self.B, self.per = block_tokens, pages_per_block
        # (-remaining, holding, final blocks), ascending
        self._items: list[tuple[int, int, int]] = sorted(self._item(r, h) for r, h in requests)

    def _item(self, remaining: int, holding: int) -> tuple[int, int, int]:
        return -remaining, holding, -(-(holding + remaining) // self.B)

    def add(self, remaining: int, holding: int) -> tuple[int, int, int]:
        item = self._item(remaining, holding)
        bisect.insort(self._items, item)
        return item

    def remove(self, item: tuple[int, int, int]) -> None:
        del self._items[bisect.bisect_left(self._items, item)]

    def pages(self) -> int:
        best = held = final = 0
        extra = self.B - 1
        for i, (neg_rem, holding, final_blocks) in enumerate(self._items, 1):
            held += holding
            final += final_blocks
            blocks = min((held + i * (extra - neg_rem)) // self.B, final)
            if blocks > best:
                best = blocks
        return best * self.per
