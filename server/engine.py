"""The engine: one thread owns the device and runs scheduler -> model runner -> sampler.

Other threads (the gRPC servicers) talk to it only through a thread-safe inbox: submit a
request, abort one, or run a small function between steps (admin operations).

The loop keeps one step in flight: it schedules and launches step N+1, then waits for step N's
tokens. Decodes in step N+1 take their input token from step N's output on the device, so the
host's work per step (scheduling, inputs, kernel launches, output handling) overlaps the GPU's
instead of leaving it idle (see Request.inflight for the bookkeeping).

Outputs go back through an outbox that is flushed after a launch, before the wait. A flush wakes
each servicer event loop once, which then wants the GIL for the stream writes; woken in the
middle of the engine's host work, it made that work wait (Python hands the GIL over only every
5 ms). Woken while the engine thread waits on the device, it runs in time the engine does not
need.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from kernels.batch import AttnBatch, LoraBatch, to_device
from server.adapters import AdapterManager
from server.block_tables import BlockTables
from server.model import LlamaModel
from server.pool import AdapterTable, UnifiedPool
from server.request import Finish, Output, Request
from server.sampler import sample
from server.scheduler import Scheduler, SchedulerConfig

log = logging.getLogger("loraserve.engine")

# grouped decode LoRA when adapters average at least this many tokens each in the step (on the
# H100, 256 tokens, with the grouped shrink's split-K: 2 tokens per adapter 300 vs 225 us for the
# per-token schedule, 4: 180 vs 194, 16: 93 vs 174; benchmarks/results/engine-2026-11-25f-h100/)
GROUP_MIN_TOKENS = 4


@dataclass
class EngineStats:
    steps: int = 0
    generated_tokens: int = 0
    # where the engine thread's time goes: busy is the loop's wall time while it has work; host
    # is scheduling + batch metadata + output handling, device is launching steps and waiting
    # for their tokens. The rest of busy is outside steps (inbox, waiting for the GIL).
    busy_s: float = 0.0
    sched_s: float = 0.0
    prep_s: float = 0.0
    device_s: float = 0.0
    post_s: float = 0.0
    # the device's own time per step (CUDA events, from the moment the stream reaches the step
    # to its tokens on the host): with host work overlapped, gpu_s / busy_s nears 1
    gpu_s: float = 0.0
    prefill_steps: int = 0
    prefill_tokens: int = 0
    prefill_gpu_s: float = 0.0      # of gpu_s: steps that prefilled (eager)
    graph_steps: int = 0
    # decode steps: tokens, distinct adapters and adapter bytes they read (each distinct adapter's
    # rows once: the floor of what LoRA adds to a memory-bound step)
    decode_steps: int = 0
    decode_tokens: int = 0
    decode_adapters: int = 0
    decode_adapter_bytes: int = 0
    # adapters copied into the pool and evicted from it (the manager's counters, as of the window)
    adapter_loads: int = 0
    adapter_evictions: int = 0

    @property
    def host_s(self) -> float:
        return self.sched_s + self.prep_s + self.post_s

    def since(self, before: "EngineStats") -> "EngineStats":
        return EngineStats(**{k: v - getattr(before, k) for k, v in vars(self).items()})

    def summary(self, weight_bytes: int) -> str:
        n = max(self.decode_steps, 1)
        busy = max(self.busy_s, 1e-9)
        return (f"steps={self.steps} decode_steps={self.decode_steps} graph_steps={self.graph_steps} "
                f"prefill_steps={self.prefill_steps} prefill_tokens={self.prefill_tokens} "
                f"prefill_ms_per_step={1e3 * self.prefill_gpu_s / max(self.prefill_steps, 1):.1f} "
                f"decode_ms_per_step={1e3 * (self.gpu_s - self.prefill_gpu_s) / n:.1f} "
                f"mean_decode_batch={self.decode_tokens / n:.1f} "
                f"mean_distinct_adapters={self.decode_adapters / n:.1f} "
                f"adapter_GB_per_decode_step={self.decode_adapter_bytes / n / 1e9:.2f} "
                f"adapter_bytes_vs_weights={self.decode_adapter_bytes / n / max(weight_bytes, 1):.3f} "
                f"adapter_loads={self.adapter_loads} adapter_evictions={self.adapter_evictions} "
                f"busy_s={self.busy_s:.2f} ms_per_step={1e3 * self.busy_s / max(self.steps, 1):.2f} "
                f"gpu={self.gpu_s / busy:.0%} "
                f"device={self.device_s / busy:.0%} sched={self.sched_s / busy:.0%} prep={self.prep_s / busy:.0%} "
                f"post={self.post_s / busy:.0%} outside={(busy - self.host_s - self.device_s) / busy:.0%}")


# the engine logs its stats over each window of this many busy seconds (at info level)
STATS_EVERY_S = 10.0
# a folder: the engine thread runs under cProfile and writes each stats window's profile there
# (window-NNN.prof, NNN as in the window's log line); a diagnostic, it slows the host work
PROFILE_DIR = os.environ.get("LORASERVE_PROFILE_ENGINE")
# decode rows of a token-schedule LoRA step in descending adapter rank (base rows last): a launch's
# programs start in row order, so the longest (rank 64) start first and the LoRA launches do not
# end on their tail. At 256 requests over 256 adapters (ranks 8-64, int8 rows, H200,
# benchmarks/results/lora-segment-2026-12-04-h200): the decode LoRA alone 2.99 vs 3.10 ms a step
# in arrival order; the engine's step +17.3% over base vs +18.4% (six rounds alternated).
# "arrival" keeps the scheduler's order (a benchmark's baseline).
DECODE_ORDER = os.environ.get("LORASERVE_DECODE_ORDER", "rank")


class Engine:
    def __init__(self, model: LlamaModel, pool: UnifiedPool, table: AdapterTable,
                 adapters: AdapterManager, sched_cfg: SchedulerConfig, stream_interval: int = 1):
        """stream_interval: a running request's tokens go to its stream this many at a time (its
        first token and its last go at once). Each message costs the servicers' event loop, which
        shares the GIL with this thread, 60-80 us on a CPU core (benchmarks/servicer_cpu.sh)."""
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {stream_interval}")
        self.model, self.pool, self.table, self.adapters = model, pool, table, adapters
        self.stream_interval = stream_interval
        self.cfg = model.full_cfg          # the whole model's config (pool.cfg: this rank's shard)
        self.tp = model.tp
        self.scheduler = Scheduler(sched_cfg, pool, adapters, agree=self._agree if self.tp.enabled else None)
        self.max_model_len = sched_cfg.max_model_len
        self.eos = set(model.cfg.eos_token_ids)
        self.stats = EngineStats()
        self._logged = EngineStats()     # the stats at the last window log
        self._inbox: queue.Queue = queue.Queue()
        self._outbox: list[tuple[Request, Output]] = []   # emitted at the next _flush
        self._by_id: dict[str, Request] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.graphs = None   # server.cuda_graphs.DecodeGraphs once captured (CUDA only)
        self._inflight: _Launched | None = None   # the step on the device whose tokens are unread
        self.block_tables = BlockTables(2 * sched_cfg.max_num_seqs, -(-self.max_model_len // pool.block_tokens),
                                        2 * pool.cfg.num_layers, pool.device)

    def capture_graphs(self, max_batch: int, max_rank: int, batches: list[int] | None = None) -> None:
        """Capture decode CUDA graphs (before start()); steps that fit replay them. batches: only
        the buckets these sizes need (see DecodeGraphs)."""
        if self.pool.device.type != "cuda":
            return
        from server.cuda_graphs import DecodeGraphs
        g = DecodeGraphs(self.model, self.pool, self.table, max_batch, self.max_model_len, max_rank, batches)
        g.capture()
        self.graphs = g

    # -- thread-safe API -----------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if not self.tp.enabled:
            self._stop.set()
        self._inbox.put(None)   # under TP rank 0 broadcasts the stop; other ranks wait for it
        if self._thread:
            self._thread.join(timeout=10)
        self.adapters.close()

    def submit(self, req: Request) -> None:
        self._inbox.put(("add", req))

    def abort(self, request_id: str, req: Request | None = None) -> None:
        """End a request. With ``req``, only that one: a stream that ends must not abort another
        stream's request of the same id."""
        self._inbox.put(("abort", request_id, req))

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run fn on the engine thread between steps; the future carries its result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", fn, fut))
        return fut

    # -- the loop --------------------------------------------------------------------------
    def _loop(self) -> None:
        st = self.stats
        prof, window = None, 0
        if PROFILE_DIR:
            import cProfile
            os.makedirs(PROFILE_DIR, exist_ok=True)
            prof = cProfile.Profile()
            prof.enable()
        while not self._stop.is_set():
            try:
                idle = not self.scheduler.has_work and self._inflight is None
                if idle:
                    self._flush()
                self._drain(block=idle)
                if not self.scheduler.has_work and self._inflight is None:
                    continue
                t0 = time.perf_counter()
                step = self.scheduler.schedule()
                self._fail_rejected()
                st.sched_s += time.perf_counter() - t0
                if not self._overlap(step):
                    self._drain(block=True, timeout=0.005)   # waiting on an adapter fetch
                st.busy_s += time.perf_counter() - t0
                if st.busy_s - self._logged.busy_s >= STATS_EVERY_S:
                    st.adapter_loads, st.adapter_evictions = self.adapters.loads, self.adapters.evictions
                    log.info("stats window=%d %s", window, st.since(self._logged).summary(self.model.weight_bytes))
                    self._logged = dataclasses.replace(st)
                    if prof is not None:
                        prof.disable()
                        prof.dump_stats(os.path.join(PROFILE_DIR, f"window-{window:03d}.prof"))
                        prof = cProfile.Profile()
                        prof.enable()
                    window += 1
            except Exception:   # never let one bad step kill the engine: fail what was running
                log.exception("engine step failed; aborting the running requests")
                self._inflight = None
                for req in list(self.scheduler.running):
                    self._finish(req, None, error=("INTERNAL", "engine step failed"))
                self._flush()

    def _drain(self, block: bool, timeout: float | None = None) -> None:
        if self.tp.enabled:
            return self._drain_tp(block, timeout)
        try:
            item = self._inbox.get(block=block, timeout=timeout)
        except queue.Empty:
            return
        while item is not None:
            self._handle(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    # -- tensor parallelism: every rank runs this loop; rank 0 owns the inbox ---------------
    def _drain_tp(self, block: bool, timeout: float | None) -> None:
        """Rank 0 takes what arrived and broadcasts it, so every rank schedules the same steps."""
        import random

        import torch.distributed as dist

        msgs = []
        if self.tp.rank == 0:
            items = []
            try:
                items.append(self._inbox.get(block=block, timeout=timeout))
                while True:
                    items.append(self._inbox.get_nowait())
            except queue.Empty:
                pass
            for it in items:
                if it is None:
                    msgs.append(("stop",))
                elif it[0] == "add":
                    req = it[1]
                    if self._duplicate(req):
                        continue
                    if req.seed is None:    # same draws on every rank
                        req.seed = random.getrandbits(62)
                    msgs.append(("add", req.request_id, req.prompt_ids, req.params, req.adapter_id, req.seed))
                    self._by_id[req.request_id] = req
                elif it[0] == "abort":
                    if it[2] is None or self._by_id.get(it[1]) is it[2]:
                        msgs.append(("abort", it[1], None))
                else:                               # admin calls run on rank 0 only
                    self._handle(it)
        box = [msgs]
        dist.broadcast_object_list(box, src=0, group=self.tp.cpu_group)
        for m in box[0]:
            if m[0] == "stop":
                self._stop.set()
            elif m[0] == "add":
                _, rid, prompt, params, adapter, seed = m
                req = self._by_id.get(rid) if self.tp.rank == 0 else None
                if req is None:
                    req = Request(rid, prompt, params, adapter, seed=seed)
                self._handle(("add", req))
            else:
                self._handle(m)

    def _agree(self, codes: list[int]) -> list[int]:
        """Element-wise minimum over ranks (adapter readiness: 1 ready, 0 pending, -1 failed)."""
        import torch.distributed as dist

        if not codes:
            return codes
        t = torch.tensor(codes, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.tp.cpu_group)
        return t.tolist()

    def _handle(self, item) -> None:
        kind = item[0]
        if kind == "add":
            req = item[1]
            if self._by_id.get(req.request_id) is req or not self._duplicate(req):
                self._by_id[req.request_id] = req
                self.scheduler.add(req)
        elif kind == "abort":
            _, rid, owner = item
            req = self._by_id.get(rid)
            if req is not None and (owner is None or owner is req):
                self._finish(req, Finish.ABORTED)
        elif kind == "call":
            _, fn, fut = item
            try:
                fut.set_result(fn())
            except Exception as e:
                fut.set_exception(e)

    def _duplicate(self, req: Request) -> bool:
        """Refuse a request whose id a live request holds: aborts go by id (cancel, deadline,
        stop string), so two live requests of one id could end each other."""
        if req.request_id not in self._by_id:
            return False
        req.finished = True
        self._outbox.append((req, Output([], [], finish=Finish.ABORTED, error=(
            "ALREADY_EXISTS", f"request_id {req.request_id!r} belongs to a request that is still running; "
                              "send a unique request_id, or none and the server assigns one"))))
        return True

    def _fail_rejected(self) -> None:
        for req, status, msg in self.scheduler.rejected:
            self._finish(req, None, error=(status, msg))
        self.scheduler.rejected.clear()

    def _finish(self, req: Request, reason: Finish | None, error=None, tokens=(), logprobs=()) -> None:
        if req.finished:
            return
        req.finished = True
        self.scheduler.remove(req)
        self.block_tables.release(req)
        if self._by_id.get(req.request_id) is req:
            del self._by_id[req.request_id]
        self._outbox.append((req, Output(req.unsent_ids + list(tokens), req.unsent_logprobs + list(logprobs),
                                         finish=reason or Finish.ABORTED, error=error)))
        req.unsent_ids, req.unsent_logprobs = [], []

    def _flush(self) -> None:
        """Hand the outputs gathered since the last flush to their streams: one call per event
        loop (see StreamQueue), the rest through each request's emit."""
        out, self._outbox = self._outbox, []
        by_loop: dict = {}
        for req, o in out:
            if req.stream is None:
                req.emit(o)
            else:
                by_loop.setdefault(req.stream.loop, []).append((req.stream.queue, o))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:     # that loop is closed (the server is stopping): nobody listens
                pass

    # -- model runner ------------------------------------------------------------------------
    def _lora_mode(self, step) -> str | None:
        """LoRA schedule of a pure decode step: "grouped" when adapters are shared by enough
        tokens that reading each once per token tile beats once per token (tokens are then
        sorted by slot), else "token"; None without adapters."""
        slots = [r.slot for r in step.decodes if r.slot >= 0]
        if not slots:
            return None
        return "grouped" if len(set(slots)) * GROUP_MIN_TOKENS <= len(slots) else "token"

    def _overlap(self, step) -> bool:
        """Launch a step behind the one in flight, then read that one's tokens. The host work of
        a step (scheduling, inputs, launches, output handling) overlaps the device's work on the
        previous step instead of leaving the GPU idle. The outputs read last time go to the
        streams between the launch and the wait: the servicers' event loops then write them
        while this thread waits on the device, not while it schedules and launches (with the
        flush after the read, the loops' wake-up took 20-30% of this thread's time in GIL waits
        at 200 streams on the H100). Returns False when there was nothing to launch or read."""
        launched = None if step.empty else self._launch(step)
        self._flush()
        previous, self._inflight = self._inflight, launched
        if previous is not None:
            self._complete(previous)
        return launched is not None or previous is not None

    def _run(self, step) -> None:
        """One step, start to finish (warm-up, tests, benchmarks; the loop overlaps steps)."""
        if step.empty:
            return
        launched = self._launch(step)
        self._flush()    # the previous step's outputs, while this one runs on the device
        self._complete(launched)

    def _launch(self, step) -> "_Launched":
        """Queue one step on the device: inputs, forward, sampling, and the copy of the sampled
        tokens to the host. Nothing here waits for the device, so the host prepares this step
        while the previous one still runs; a decode whose input token is still in flight reads
        it from the previous step's output on the device."""
        t0 = time.perf_counter()
        mode = self._lora_mode(step)     # of the decodes (in a mixed step: its decode part)
        if mode == "grouped":
            step.decodes.sort(key=lambda r: r.slot)
        elif mode == "token" and DECODE_ORDER == "rank":
            ranks = self.table.max_rank
            step.decodes.sort(key=lambda r: -ranks[r.slot] if r.slot >= 0 else 1)
        seqs = step.prefills + step.decodes
        B = self.pool.block_tokens
        dev = self.model.device
        ids, pos, q_host, seq_lens, slots, logits_idx = [], [], [], [], [], []
        feed_dst, feed_src = [], []      # ids rows taken from the in-flight step's tokens
        for req in seqs:
            start, end = req.num_computed, req.total_len
            if len(req.blocks) * B < end:     # the kernels would write K/V through a stale table entry
                raise RuntimeError(f"request {req.request_id} holds KV blocks for {len(req.blocks) * B} tokens and "
                                   f"this step writes up to token {end}: the scheduler grows a request first")
            if end - start == 1 and req.inflight:      # decode of a token still on the device
                assert req.inflight == 1 and self._inflight is not None, "one step in flight at most"
                feed_dst.append(len(ids))
                feed_src.append(req.last_row)
                ids.append(0)
            elif end - start == 1 and req.output_ids:   # decode of a token the host has read
                ids.append(req.output_ids[-1])
            else:
                ids += req.all_ids[start:end]
            pos += range(start, end)
            q_host.append((len(ids) - (end - start), len(ids), end))
            seq_lens.append(end - start)
            slots.append(req.slot)
            logits_idx.append(len(ids) - 1)
        S = len(seqs)
        rows = self.block_tables.sync(seqs)
        max_blocks = max(len(r.blocks) for r in seqs)
        pos_d = to_device(pos, torch.int64, dev)
        token_pages = self.block_tables.token_pages(rows, seq_lens, pos_d, B)
        off_d = (pos_d % B).to(torch.int32)
        ctx = [n for _, _, n in q_host]
        used = {s for s in slots if s >= 0}
        max_rank = max((self.table.max_rank[s] for s in used), default=0)
        mlp = any(self.table.mlp[s] for s in used)
        ids_d = to_device(ids, torch.int64, dev)
        if feed_dst:
            src = self._inflight.tokens.index_select(0, to_device(feed_src, torch.int64, dev))
            ids_d.index_copy_(0, to_device(feed_dst, torch.int64, dev), src)
        ctx_d = to_device(ctx, torch.int32, dev)
        t1 = time.perf_counter()
        cuda = dev.type == "cuda"
        began = torch.cuda.Event(enable_timing=True) if cuda else None
        if began is not None:
            began.record()
        graph = (self.graphs is not None and not step.prefills
                 and self.graphs.fits(S, max_rank, max(ctx), max_blocks))
        if graph:
            logits = self.graphs.run(ids_d, pos_d, self.block_tables.gather(rows, max_blocks), ctx_d,
                                     token_pages, off_d, to_device(slots, torch.int32, dev),
                                     lora=mode if max_rank > 0 else None, mlp=mlp)
        else:
            attn = AttnBatch(
                block_tables=self.block_tables.gather(rows, max_blocks),
                q_indptr=to_device([0] + [q1 for _, q1, _ in q_host], torch.int32, dev),
                context_lens=ctx_d, token_pages=token_pages, token_offsets=off_d,
                max_q_len=max(seq_lens), max_context=max(ctx), q_host=q_host)
            lora = (LoraBatch.build(seq_lens, slots, max_rank, dev, grouped=mode == "grouped", mlp=mlp,
                                    decode_from=len(step.prefills)) if max_rank > 0 else None)
            logits = self.model.forward(ids_d, pos_d, attn, lora, self.pool, self.table,
                                        to_device(logits_idx, torch.int64, dev))
        tokens_d, logps_d = sample(logits, [r.params for r in seqs], [(r.seed, r.total_len) for r in seqs])
        out = _Launched(seqs, [r.epoch for r in seqs], tokens_d, tokens_d, logps_d, began=began)
        if cuda:   # the host copies land in pinned memory; `done` marks them (and the step) finished
            out.tokens_host = torch.empty(S, dtype=tokens_d.dtype, pin_memory=True)
            out.tokens_host.copy_(tokens_d, non_blocking=True)
            out.logps_host = torch.empty(S, dtype=logps_d.dtype, pin_memory=True)
            out.logps_host.copy_(logps_d, non_blocking=True)
            out.done = torch.cuda.Event(enable_timing=True)
            out.done.record()
        t2 = time.perf_counter()
        out.cpu_s = 0.0 if cuda else t2 - t1
        for i, req in enumerate(seqs):
            req.num_computed = req.total_len
            req.inflight += 1
            req.last_row = i
        st = self.stats
        st.steps += 1
        st.graph_steps += graph
        if step.prefills:
            out.prefill = True
            st.prefill_steps += 1
            st.prefill_tokens += sum(seq_lens[:len(step.prefills)])
        else:
            st.decode_steps += 1
            st.decode_tokens += S
            st.decode_adapters += len(used)
            st.decode_adapter_bytes += sum(self.table.nbytes[s] for s in used)
        st.prep_s += t1 - t0
        st.device_s += t2 - t1
        return out

    def _complete(self, launched: "_Launched") -> None:
        """Wait for a launched step, then hand its tokens to their requests (in the outbox).
        A request that left the running set since the launch (finished, aborted, preempted)
        gets nothing: its token is void."""
        t0 = time.perf_counter()
        if launched.done is not None:
            launched.done.synchronize()
        tokens, logps = launched.tokens_host.tolist(), launched.logps_host.tolist()
        t1 = time.perf_counter()
        st = self.stats
        gpu = launched.began.elapsed_time(launched.done) / 1e3 if launched.done is not None else launched.cpu_s
        st.gpu_s += gpu
        if launched.prefill:
            st.prefill_gpu_s += gpu
        for req, epoch, tok, lp in zip(launched.seqs, launched.epochs, tokens, logps):
            if req.finished or req.epoch != epoch:
                continue
            req.inflight -= 1
            req.output_ids.append(tok)
            st.generated_tokens += 1
            n_out = len(req.output_ids)
            reason = None
            if tok in self.eos and not req.params.ignore_eos:
                reason = Finish.EOS
            elif n_out >= req.params.max_new_tokens or len(req.prompt_ids) + n_out >= self.max_model_len:
                reason = Finish.LENGTH
            lp_list = [lp] if req.params.logprobs else []
            if reason is None:
                req.unsent_ids.append(tok)
                req.unsent_logprobs += lp_list
                if len(req.unsent_ids) >= self.stream_interval or n_out == 1:   # the first at once: TTFT
                    self._outbox.append((req, Output(req.unsent_ids, req.unsent_logprobs)))
                    req.unsent_ids, req.unsent_logprobs = [], []
            else:
                self._finish(req, reason, tokens=[tok], logprobs=lp_list)
        st.device_s += t1 - t0
        st.post_s += time.perf_counter() - t1


@dataclass(eq=False)
class _Launched:
    """A step queued on the device whose sampled tokens the host has not read yet."""
    seqs: list[Request]
    epochs: list[int]          # each request's epoch at launch: a token for an older one is void
    tokens: torch.Tensor       # sampled tokens on the device (the next step's decode inputs)
    tokens_host: torch.Tensor  # their host copy (pinned on CUDA), valid once `done` fired
    logps_host: torch.Tensor   # log-probabilities, on the host likewise
    began: "torch.cuda.Event | None" = None
    done: "torch.cuda.Event | None" = None
    cpu_s: float = 0.0         # without CUDA: the step's compute time
    prefill: bool = False


def _deliver(items: list) -> None:
    """On a servicer's event loop: put each output on its stream's queue."""
    for queue, out in items:
        queue.put_nowait(out)
