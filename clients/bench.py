"""``loraserve bench``: drive a server with S-LoRA's synthetic workload (or a trace) and report
throughput, latency, first-token latency, per-token latency and SLO attainment.

The metrics follow S-LoRA's benchmarks/run_exp.py:

- throughput: finished requests / total time (req/s); also output tokens/s and total tokens/s.
- strip_throughput: the same without the first and last 10 s and their share of requests
  (rate x 10 each), S-LoRA's "throughput strip" (synthetic workloads, whose rate is known).
- avg_latency: mean end-to-end latency of finished requests (from the moment it was sent).
- first-token latency (TTFT): time to the first streamed token; mean, p50, p90, p99.
- avg_per_token_latency: mean of latency / (prompt + output tokens); avg_per_output_token_latency:
  mean of latency / output tokens (S-LoRA's two); avg_tpot: mean of (latency - ttft) / (tokens - 1).
- slo_attainment: share of *all* requests (failed ones count as misses) whose first token came
  in under ``slo`` seconds (S-LoRA: 6 s).
- avg_satisfaction: S-LoRA's user satisfaction, the mean over *all* requests of 1 - (ttft / slo)^2
  below the SLO and 0 from it on (failed requests: 0).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from clients.workload import (Request, WorkloadSpec, generate_workload, load_trace, save_trace,
                              synthetic_adapter_ids, with_adapters, workload_summary)

DEFAULT_RANKS = (64, 32, 16, 8)      # S-LoRA's S2, in its order: adapter i has rank [64, 32, 16, 8][i % 4]
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")

__all__ = ["RequestResult", "compute_metrics", "run_requests", "run_workload", "add_bench_args", "run_bench",
           "ensure_synthetic_adapters", "format_table", "DEFAULT_RANKS", "DEFAULT_TARGETS"]


@dataclass
class RequestResult:
    index: int
    adapter_id: str
    input_len: int
    output_len: int               # requested
    scheduled: float              # offset in the trace (s)
    sent: float = 0.0             # offset when it was actually sent (s)
    first_token_latency: float | None = None
    latency: float | None = None
    completion_tokens: int = 0
    error: str = ""               # grpc status code name, "" when it finished
    error_details: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.latency is not None


def _pct(xs: Sequence[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if len(xs) else None


def _mean(xs: Sequence[float]) -> float | None:
    return float(np.mean(xs)) if len(xs) else None


def satisfaction(ttft: float | None, slo: float = 6.0) -> float:
    """S-LoRA's reward for a first-token latency: 1 at once, falling as a parabola to 0 at the SLO."""
    return 0.0 if ttft is None or ttft >= slo else 1.0 - (ttft / slo) ** 2


def compute_metrics(results: Sequence[RequestResult], total_time: float, slo: float = 6.0,
                    req_rate: float | None = None, strip_s: float = 10.0) -> dict:
    """S-LoRA's metrics over one run (see the module docstring)."""
    ok = [r for r in results if r.ok]
    ttft = [r.first_token_latency for r in ok if r.first_token_latency is not None]
    lat = [r.latency for r in ok]
    out_tokens = sum(r.completion_tokens for r in ok)
    in_tokens = sum(r.input_len for r in ok)
    per_out = [r.latency / r.completion_tokens for r in ok if r.completion_tokens > 0]
    per_tok = [r.latency / (r.input_len + r.completion_tokens) for r in ok if r.input_len + r.completion_tokens > 0]
    tpot = [(r.latency - r.first_token_latency) / (r.completion_tokens - 1) for r in ok
            if r.completion_tokens > 1 and r.first_token_latency is not None]
    errors: dict[str, int] = {}
    first_errors: dict[str, str] = {}
    for r in results:
        if not r.ok:
            errors[r.error or "UNFINISHED"] = errors.get(r.error or "UNFINISHED", 0) + 1
            first_errors.setdefault(r.error or "UNFINISHED", r.error_details)
    attained = sum(1 for r in ok if r.first_token_latency is not None and r.first_token_latency < slo)
    t = max(total_time, 1e-9)
    strip = None
    if req_rate and total_time > 2 * strip_s:
        strip = (len(ok) - 2 * int(req_rate * strip_s)) / (total_time - 2 * strip_s)
    return {
        "num_requests": len(results), "num_finished": len(ok), "num_failed": len(results) - len(ok),
        "errors": errors, "error_examples": first_errors, "total_time": total_time,
        "throughput": len(ok) / t, "strip_throughput": strip,
        "output_token_throughput": out_tokens / t,
        "total_token_throughput": (out_tokens + in_tokens) / t,
        "avg_latency": _mean(lat),
        "avg_first_token_latency": _mean(ttft),
        "p50_first_token_latency": _pct(ttft, 50), "p90_first_token_latency": _pct(ttft, 90),
        "p99_first_token_latency": _pct(ttft, 99),
        "avg_per_token_latency": _mean(per_tok),
        "avg_per_output_token_latency": _mean(per_out),
        "avg_tpot": _mean(tpot),
        "slo": slo,
        "slo_attainment": attained / len(results) if results else None,
        "avg_satisfaction": _mean([satisfaction(r.first_token_latency if r.ok else None, slo) for r in results]),
        "completion_tokens": out_tokens, "prompt_tokens": in_tokens,
    }


# ---------------------------------------------------------------------------------------- progress

class ProgressLine:
    """One status line on stderr: rewritten in place on a TTY, else a line every 10 s."""

    def __init__(self, label: str, total: int, quiet: bool = False):
        self.label, self.total, self.quiet = label, total, quiet
        self.sent = self.done = self.failed = 0
        self.t0 = time.perf_counter()
        self._last = 0.0
        try:
            self.tty = sys.stderr.isatty()
        except (AttributeError, ValueError):
            self.tty = False

    def tick(self, force: bool = False) -> None:
        if self.quiet:
            return
        now = time.perf_counter()
        period = 0.25 if self.tty else 10.0
        if not force and now - self._last < period:
            return
        self._last = now
        line = (f"[{self.label}] {now - self.t0:7.1f}s sent {self.sent}/{self.total} "
                f"done {self.done} failed {self.failed} in-flight {self.sent - self.done - self.failed}")
        sys.stderr.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.quiet:
            return
        self.tick(force=True)
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


# ---------------------------------------------------------------------------------------- driver

async def run_requests(client, requests: Sequence[Request], *, duration: float | None = None,
                       drain_timeout: float = 600.0, request_timeout: float | None = None,
                       quiet: bool = True, label: str = "bench") -> tuple[list[RequestResult], float]:
    """Send ``requests`` at their timestamps through an ``AsyncClient`` (one stream each, all
    concurrent); requests scheduled after ``duration`` are not sent. Waits at most
    ``drain_timeout`` s after the last send, then cancels what is left (error CANCELLED).
    Returns (results, total_time)."""
    from clients.client import LoraServeError  # noqa: PLC0415

    if duration is not None:
        requests = [r for r in requests if r.timestamp <= duration]
    results = [RequestResult(r.index, r.adapter_id, r.input_len, r.output_len, r.timestamp) for r in requests]
    bar = ProgressLine(label, len(requests), quiet)
    loop = asyncio.get_running_loop()
    start = loop.time()
    t0 = time.perf_counter()
    last_done = [t0]

    async def one(req: Request, res: RequestResult) -> None:
        sent = time.perf_counter()
        res.sent = sent - t0
        bar.sent += 1
        try:
            n = 0
            async for chunk in client.generate(prompt_token_ids=req.prompt_token_ids, adapter_id=req.adapter_id,
                                               max_new_tokens=req.output_len, ignore_eos=True, temperature=0.0,
                                               timeout=request_timeout, request_id=f"bench-{req.index}"):
                if chunk.token_ids and res.first_token_latency is None:
                    res.first_token_latency = time.perf_counter() - sent
                n += len(chunk.token_ids)
                if chunk.finished and chunk.finish_reason == "aborted":
                    res.error = "ABORTED"
            res.completion_tokens = n
            if not res.error:
                res.latency = time.perf_counter() - sent
                bar.done += 1
            else:
                bar.failed += 1
        except LoraServeError as e:
            res.error, res.error_details = e.code.name, e.details
            bar.failed += 1
        except asyncio.CancelledError:
            res.error = res.error or "CANCELLED"
            bar.failed += 1
            raise
        finally:
            last_done[0] = max(last_done[0], time.perf_counter())
            bar.tick()

    tasks: list[asyncio.Task] = []

    async def ticker():
        while True:
            bar.tick()
            await asyncio.sleep(0.25)

    tick_task = asyncio.create_task(ticker())
    try:
        for req, res in zip(requests, results):
            delay = start + req.timestamp - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(req, res)))
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=drain_timeout)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
    finally:
        tick_task.cancel()
        for t in tasks:
            if not t.done():
                t.cancel()
        bar.close()
    total = max(last_done[0] - t0, 1e-9)
    for res in results:
        if not res.ok and not res.error:
            res.error = "CANCELLED"
    return results, total


async def ensure_synthetic_adapters(client, n: int, ranks: Sequence[int] = DEFAULT_RANKS,
                                    targets: Sequence[str] = DEFAULT_TARGETS, base_model: str = "",
                                    concurrency: int = 32, quiet: bool = True) -> list[str]:
    """Register bench-00000 .. bench-{n-1} as synthetic adapters (rank ``ranks[i % len(ranks)]``,
    seed ``i``) through the store. One that exists with this rank and these targets is kept; one
    left by a run of another setting (S1 after S2) is replaced. Returns the ids."""
    from clients.client import NotFound  # noqa: PLC0415

    ids = synthetic_adapter_ids(n)
    sem = asyncio.Semaphore(concurrency)
    created = [0]

    async def one(i: int, aid: str) -> None:
        rank = ranks[i % len(ranks)]
        async with sem:
            try:
                info = await client.get_adapter(aid)
                if info.rank == rank and sorted(info.target_modules) == sorted(targets):
                    return
                replace = True
            except NotFound:
                replace = False
            await client.register_synthetic(aid, rank=rank, target_modules=list(targets), seed=i,
                                            base_model=base_model, replace=replace)
            created[0] += 1

    await asyncio.gather(*(one(i, a) for i, a in enumerate(ids)))
    if not quiet:
        print(f"synthetic adapters: {n} ready ({created[0]} registered now)", file=sys.stderr)
    return ids


async def detect_vocab_size(client, upper: int = 256) -> int:
    """The number of token ids (up to ``upper``) the server accepts in prompts: EngineStats'
    vocab_size when the server reports one, else a binary search with 1-token requests (the
    server answers INVALID_ARGUMENT for an id outside its vocabulary)."""
    from clients.client import InvalidArgument  # noqa: PLC0415
    from clients.pb import loraserve_pb2 as pb  # noqa: PLC0415

    if "vocab_size" in pb.EngineStats.DESCRIPTOR.fields_by_name:
        raw = await client._unary(client._admin.GetStats, pb.GetStatsRequest(), None, True)
        if getattr(raw, "vocab_size", 0):
            return min(upper, int(raw.vocab_size))

    async def accepted(tid: int) -> bool:
        try:
            await client.complete(prompt_token_ids=[tid], max_new_tokens=1, ignore_eos=True)
            return True
        except InvalidArgument:
            return False

    if await accepted(upper - 1):
        return upper
    lo, hi = 0, upper - 1          # lo accepted, hi refused
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if await accepted(mid):
            lo = mid
        else:
            hi = mid
    return hi


async def _engine_stats(client):
    """The engine's counters, or None where GetStats is not served (another server)."""
    try:
        return await client.stats()
    except Exception:  # noqa: BLE001 - the run goes on without the engine's view
        return None


async def _engine_window(client, before) -> dict | None:
    """What the engine's decode steps did during a run (EngineStats.decode_window)."""
    after = await _engine_stats(client)
    return after.decode_window(before) if after is not None and before is not None else None


async def cold_pool(client) -> int:
    """Unload every adapter resident in the engine's GPU pool, keeping the host copies; returns how many."""
    stats = await _engine_stats(client)
    ids = stats.resident_adapters if stats is not None else []
    for aid in ids:
        await client.unload_adapter(aid, keep_host=True)
    return len(ids)


async def warm_host_cache(client, adapter_ids: Sequence[str], concurrency: int = 16, quiet: bool = False) -> float:
    """LoadAdapter(host_only) for each adapter, `concurrency` at a time; returns the seconds taken."""
    t0 = time.monotonic()
    sem = asyncio.Semaphore(concurrency)
    done = 0

    async def one(aid: str) -> None:
        nonlocal done
        async with sem:
            await client.load_adapter(aid, host_only=True)
        done += 1
        if not quiet and sys.stderr.isatty():
            print(f"\rwarming host cache: {done}/{len(adapter_ids)}", end="", file=sys.stderr, flush=True)

    await asyncio.gather(*[one(a) for a in adapter_ids])
    if not quiet and sys.stderr.isatty():
        print(file=sys.stderr)
    return round(time.monotonic() - t0, 3)


async def run_workload(target: str, requests: Sequence[Request], *, token: str | None = None,
                       duration: float | None = None, drain_timeout: float = 600.0,
                       request_timeout: float | None = None, quiet: bool = True,
                       label: str = "bench") -> tuple[list[RequestResult], float]:
    """``run_requests`` over a fresh ``AsyncClient`` to ``target``."""
    from clients.client import AsyncClient  # noqa: PLC0415

    async with AsyncClient(target, token=token) as client:
        return await run_requests(client, requests, duration=duration, drain_timeout=drain_timeout,
                                  request_timeout=request_timeout, quiet=quiet, label=label)


# ---------------------------------------------------------------------------------------- output

_COLUMNS = [
    ("requests", "num_requests", "{:d}"), ("failed", "num_failed", "{:d}"),
    ("req/s", "throughput", "{:.3f}"), ("out tok/s", "output_token_throughput", "{:.1f}"),
    ("avg lat s", "avg_latency", "{:.3f}"), ("ttft p50", "p50_first_token_latency", "{:.3f}"),
    ("ttft p90", "p90_first_token_latency", "{:.3f}"), ("ttft p99", "p99_first_token_latency", "{:.3f}"),
    ("s/out tok", "avg_per_output_token_latency", "{:.4f}"), ("SLO att.", "slo_attainment", "{:.3f}"),
    ("satisf.", "avg_satisfaction", "{:.3f}"),
]


def _fmt(v, f):
    if v is None:
        return "-"
    try:
        return f.format(v)
    except (ValueError, TypeError):
        return str(v)


def format_table(runs: Sequence[dict]) -> str:
    """A text table with one row per run (``{"backend", "n", "result"}``)."""
    head = ["backend", "n"] + [c[0] for c in _COLUMNS]
    rows = [[str(r.get("backend", "")), str(r.get("n", ""))] + [_fmt(r["result"].get(k), f) for _, k, f in _COLUMNS]
            for r in runs]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


_CMP_METRICS = [("throughput (req/s)", "throughput", "{:.3f}"),
                ("output tokens/s", "output_token_throughput", "{:.1f}"),
                ("avg latency (s)", "avg_latency", "{:.3f}"),
                ("ttft p50 (s)", "p50_first_token_latency", "{:.3f}"),
                ("ttft p90 (s)", "p90_first_token_latency", "{:.3f}"),
                ("s per output token", "avg_per_output_token_latency", "{:.4f}"),
                ("SLO attainment", "slo_attainment", "{:.3f}")]


def format_comparison(runs: Sequence[dict]) -> str:
    """Per n, the backends side by side with the ratio loraserve / other for each metric
    (throughput: > 1 means loraserve is faster; latencies: < 1 means loraserve is faster)."""
    by_n: dict = {}
    for r in runs:
        by_n.setdefault(r.get("n"), {})[r["backend"]] = r["result"]
    blocks = []
    for n, backs in by_n.items():
        ref = backs.get("loraserve")
        others = [b for b in backs if b != "loraserve"]
        if not ref or not others:
            continue
        head = ["n=" + str(n)] + list(backs) + [f"loraserve/{o}" for o in others]
        rows = []
        for label, key, f in _CMP_METRICS:
            cells = [label] + [_fmt(backs[b].get(key), f) for b in backs]
            for o in others:
                a, b = ref.get(key), backs[o].get(key)
                cells.append(f"{a / b:.2f}x" if a is not None and b else "-")
            rows.append(cells)
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        fmt = lambda cells: "  ".join(c.ljust(w) if k == 0 else c.rjust(w)  # noqa: E731
                                      for k, (c, w) in enumerate(zip(cells, widths)))
        blocks.append("\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]))
    return "\n\n".join(blocks)


def plot_runs(runs: Sequence[dict], path: str, base: dict | None = None) -> str | None:
    """Throughput and first-token latency vs n (see ``runs_figure``) written to ``path``.
    Returns the path, or None (with a message on stderr) when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("note: matplotlib is not installed; skipping the plot (pip install matplotlib)", file=sys.stderr)
        return None
    fig = runs_figure(runs, base)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def runs_figure(runs: Sequence[dict], base: dict | None = None):
    """Throughput and first-token latency vs n, one line per backend, and ``base`` (a base-only
    run of the same workload) as a dashed line. The axes start at zero: a 1% dip must not
    fill the plot."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for backend in dict.fromkeys(r["backend"] for r in runs):
        rs = sorted((r for r in runs if r["backend"] == backend), key=lambda r: r["n"])
        ns = [r["n"] for r in rs]
        a1.plot(ns, [r["result"]["throughput"] for r in rs], marker="o", label=backend)
        a2.plot(ns, [r["result"]["avg_first_token_latency"] or float("nan") for r in rs], marker="o", label=backend)
    if base is not None:
        a1.axhline(base["result"]["throughput"], ls="--", color="gray", label="base model only")
        a2.axhline(base["result"]["avg_first_token_latency"] or float("nan"), ls="--", color="gray",
                   label="base model only")
    for ax, title in ((a1, "throughput (req/s)"), (a2, "avg first-token latency (s)")):
        ax.set_xlabel("number of adapters n")
        ax.set_title(title)
        top = max((y for line in ax.get_lines() for y in line.get_ydata() if y == y), default=0)   # (y == y: not NaN)
        ax.set_ylim(0, top * 1.1 or None)
        ax.grid(True, alpha=0.3)
        ax.legend()
    if len({r["n"] for r in runs}) > 1 and min(r["n"] for r in runs) > 0:
        a1.set_xscale("log")
        a2.set_xscale("log")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------- CLI

def _int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in str(s).split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _str_list(s: str) -> list[str]:
    return [x.strip() for x in str(s).split(",") if x.strip()]


def _range(s: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in str(s).split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (integers), got {s!r}") from None
    if not 1 <= lo < hi:
        raise argparse.ArgumentTypeError(f"need 1 <= LO < HI, got {s!r}")
    return lo, hi


BENCH_DESCRIPTION = """\
Benchmark a loraserve server with S-LoRA's synthetic workload: n adapters with power-law
popularity (exponent --alpha; 1 is uniform, smaller is more skewed), gamma arrivals at --rate
requests/s with coefficient of variation --cv, input/output lengths uniform in [lo, hi) and
ignore_eos so outputs have exactly that length; prompts are random token ids. Reports
throughput, average latency, first-token latency (p50/p90/p99), per-token latency and SLO
attainment (first token under --slo seconds) as a table, and as JSON with --out.

Adapters come from one of: --synthetic (registers bench-00000.. through the store, skipping
existing ones), --adapters a,b,c (existing ids), --base-only (no adapter), or --trace FILE
(JSONL lines with timestamp, adapter_id, input_len, output_len)."""

BENCH_EPILOG = """\
examples:
  loraserve bench --synthetic --n 100 --rate 2 --duration 60
  loraserve bench --synthetic --n 1,10,100 --duration 30 --out results.json --plot n.png
  loraserve bench --adapters sql,chat --rate 5 --max-requests 200 --input-range 8,256
  loraserve bench --base-only --rate 4 --duration 30
  loraserve bench --synthetic --n 10 --compare peft,base --model /models/llama-7b
  loraserve bench --trace trace.jsonl --out replay.json
"""


def add_bench_args(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("adapters (pick one)")
    mx = src.add_mutually_exclusive_group()
    mx.add_argument("--synthetic", action="store_true",
                    help="register n synthetic adapters bench-00000.. (skipping existing) and use them")
    mx.add_argument("--adapters", type=_str_list, metavar="A,B,C", help="use these existing adapter ids")
    mx.add_argument("--base-only", action="store_true", help="no adapter: the base model only")
    mx.add_argument("--trace", metavar="FILE", help="replay a JSONL trace (timestamp, adapter_id, input_len, output_len)")
    src.add_argument("--ranks", type=_int_list, default=list(DEFAULT_RANKS), metavar="R,R",
                     help="ranks of synthetic adapters, cycling (default 64,32,16,8: S-LoRA's S2, adapter i of rank [64,32,16,8][i %% 4])")
    src.add_argument("--targets", type=_str_list, default=list(DEFAULT_TARGETS), metavar="M,M",
                     help="target modules of synthetic adapters (default q_proj,k_proj,v_proj,o_proj)")
    src.add_argument("--base-model", default="", help="base model name for synthetic registrations (default: the store's)")

    w = p.add_argument_group("workload")
    w.add_argument("--n", type=_int_list, default=[10], metavar="N[,N..]",
                   help="number of adapters; several values run one benchmark each (default 10)")
    w.add_argument("--alpha", type=float, default=1.0, help="power-law exponent of adapter popularity (default 1: uniform)")
    w.add_argument("--rate", type=float, default=2.0, help="request rate R, requests/s (default 2)")
    w.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of inter-arrival times (default 1: Poisson)")
    w.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals (default 60)")
    w.add_argument("--max-requests", type=int, default=None, help="cap on the number of requests")
    w.add_argument("--input-range", type=_range, default=(8, 512), metavar="LO,HI", help="prompt lengths [LO, HI) (default 8,512)")
    w.add_argument("--output-range", type=_range, default=(8, 512), metavar="LO,HI", help="output lengths [LO, HI) (default 8,512)")
    w.add_argument("--seed", type=int, default=42, help="workload seed (default 42)")
    w.add_argument("--vocab-size", type=int, default=0,
                   help="prompt token ids are drawn from [3, VOCAB_SIZE) (default 0: min(256, the server's "
                        "vocabulary), found by probing)")
    w.add_argument("--save-trace", metavar="FILE", help="also write the generated workload as a JSONL trace")

    r = p.add_argument_group("run and report")
    r.add_argument("--warm", action="store_true",
                   help="before measuring, load every adapter the run draws into the engine's host memory cache "
                        "and empty the GPU pool of adapters (S-LoRA's experiments start with all adapters in host "
                        "memory); each run, and each repeat, then starts alike")
    r.add_argument("--slo", type=float, default=6.0, help="first-token latency bound for SLO attainment, s (default 6)")
    r.add_argument("--drain-timeout", type=float, default=600.0,
                   help="after the last arrival, wait at most this long for outstanding requests (default 600)")
    r.add_argument("--request-timeout", type=float, default=None, help="deadline of each request, s")
    r.add_argument("--out", metavar="FILE", help="write results as JSON")
    r.add_argument("--plot", metavar="PNG", help="plot path when several --n are given (default bench_n.png next to --out)")
    r.add_argument("--quiet", action="store_true", help="no progress line")
    r.add_argument("--compare", type=_str_list, default=[], metavar="peft,base",
                   help="also run the same workload with the PEFT baseline (needs --model) and/or base-only")
    r.add_argument("--model", metavar="DIR", help="base model folder for --compare peft")
    r.add_argument("--peft-device", default=None, help="device for the PEFT baseline (default cuda if available)")
    r.add_argument("--peft-batch-size", type=int, default=6,
                   help="the PEFT baseline's largest batch of one adapter's requests (S-LoRA: 6 in its main "
                        "runs, 50 for Llama-7B in its Table 3; 1: one request at a time)")
    r.add_argument("--peft-dtype", default="float16", choices=["float32", "float16", "bfloat16"],
                   help="dtype for the PEFT baseline (default float16; float32 on CPU)")


def _spec(args, n: int) -> WorkloadSpec:
    vocab = args.vocab_size
    return WorkloadSpec(token_low=min(3, vocab - 1), num_adapters=n, alpha=args.alpha, req_rate=args.rate, cv=args.cv, duration=args.duration,
                        input_range=tuple(args.input_range), output_range=tuple(args.output_range), seed=args.seed,
                        max_requests=args.max_requests, vocab_size=vocab)


async def _bench_async(args) -> list[dict]:
    from clients.client import AsyncClient  # noqa: PLC0415

    compare = [c.lower() for c in args.compare]
    bad = [c for c in compare if c not in ("peft", "base")]
    if bad:
        raise ValueError(f"--compare takes peft and/or base, got {bad}")
    if "peft" in compare and not args.model:
        raise ValueError("--compare peft needs --model DIR (the base model folder)")
    runs: list[dict] = []
    async with AsyncClient(args.target, token=args.token, store_target=getattr(args, "store_target", None)) as client:
        if not args.vocab_size:
            args.vocab_size = await detect_vocab_size(client)
        if args.vocab_size < 2:
            raise ValueError(f"--vocab-size must be >= 2, got {args.vocab_size}")
        # 1. the workloads
        plans: list[tuple[int, list[Request], dict]] = []
        if args.trace:
            reqs = load_trace(args.trace, seed=args.seed, vocab_size=args.vocab_size,
                              token_low=min(3, args.vocab_size - 1), max_requests=args.max_requests)
            n = len({r.adapter_id for r in reqs if r.adapter_id})
            plans.append((n, reqs, {"trace": os.path.abspath(args.trace)}))
        else:
            ns = list(args.n)
            if args.base_only:
                ns = [0]
            elif args.adapters:
                if len(ns) == 1 and ns[0] == 10 and len(args.adapters) != 10:
                    ns = [len(args.adapters)]
                ns = [min(n, len(args.adapters)) for n in ns]
                for aid in args.adapters[:max(ns)]:      # fail fast (NotFound) on a typo
                    await client.get_adapter(aid)
            elif not args.synthetic:
                raise ValueError("choose adapters: --synthetic, --adapters A,B,C, --base-only or --trace FILE")
            if args.synthetic and max(ns) > 0:
                await ensure_synthetic_adapters(client, max(ns), args.ranks, args.targets, args.base_model,
                                                quiet=args.quiet)
            for n in ns:
                if n <= 0 and not args.base_only:
                    raise ValueError("--n values must be >= 1")
                spec = _spec(args, n)
                ids = args.adapters[:n] if args.adapters else None
                reqs = generate_workload(spec, ids)
                cfg = spec.to_dict()
                cfg["mode"] = "base-only" if args.base_only else ("adapters" if args.adapters else "synthetic")
                plans.append((n, reqs, cfg))
        if args.save_trace and plans:
            save_trace(args.save_trace, plans[-1][1])

        # 2. the runs
        for n, reqs, cfg in plans:
            cfg = dict(cfg, workload=workload_summary(reqs))
            if args.warm:
                # S-LoRA preloads all n adapters into host memory; the measured window only ever
                # touches the ones the trace draws, so those are loaded (in order of first use).
                # That keeps S2's n = 2000 (~126 GB of weights, ~360 drawn in 400 requests)
                # inside the host cache, which all 2000 would overflow.
                ids = list(dict.fromkeys(r.adapter_id for r in reqs if r.adapter_id))
                cfg["warm_s"] = await warm_host_cache(client, ids, quiet=args.quiet)
                cfg["warm_adapters"] = len(ids)
                # ... and the GPU pool starts empty of adapters, as in S-LoRA's runs: what an
                # earlier run (or repeat) left resident goes back to host memory only
                cfg["pool_unloaded"] = await cold_pool(client)
            before = await _engine_stats(client)
            results, total = await run_requests(client, reqs, duration=None, drain_timeout=args.drain_timeout,
                                                request_timeout=args.request_timeout, quiet=args.quiet,
                                                label=f"loraserve n={n}")
            runs.append({"backend": "loraserve" if not args.base_only else "base", "n": n, "config": cfg,
                         "result": compute_metrics(results, total, args.slo, _rate(args)),
                         "engine": await _engine_window(client, before)})
            _report_errors(runs[-1])
            if "base" in compare and not args.base_only:  # the same arrivals, lengths and prompts
                base_reqs = with_adapters(reqs, [""])
                before = await _engine_stats(client)
                results, total = await run_requests(client, base_reqs, drain_timeout=args.drain_timeout,
                                                    request_timeout=args.request_timeout, quiet=args.quiet,
                                                    label=f"base n={n}")
                runs.append({"backend": "base", "n": n, "config": cfg,
                             "result": compute_metrics(results, total, args.slo, _rate(args)),
                             "engine": await _engine_window(client, before)})
                _report_errors(runs[-1])
            if "peft" in compare:
                from clients import peft_baseline  # noqa: PLC0415
                sources = await peft_baseline.adapter_sources_for(client, reqs, args)
                results, total = await asyncio.to_thread(
                    peft_baseline.run_peft_baseline, reqs, args.model, sources, device=args.peft_device,
                    dtype=args.peft_dtype, drain_timeout=args.drain_timeout, quiet=args.quiet, label=f"peft n={n}",
                    max_batch_size=args.peft_batch_size)
                runs.append({"backend": "peft", "n": n, "config": cfg,
                             "result": compute_metrics(results, total, args.slo, _rate(args))})
                _report_errors(runs[-1])
    return runs


def _report_errors(run: dict) -> None:
    res = run["result"]
    for code, count in res.get("errors", {}).items():
        detail = res.get("error_examples", {}).get(code, "")
        print(f"warning: [{run['backend']} n={run['n']}] {count} request(s) failed with {code}"
              + (f": {detail}" if detail else ""), file=sys.stderr)


def _rate(args) -> float | None:
    """The arrival rate, where the workload is synthetic (a trace's is whatever it holds)."""
    return None if getattr(args, "trace", None) else args.rate


def run_bench(args) -> int:
    """Entry point of ``loraserve bench`` (args from ``add_bench_args`` plus --target/--token).
    Exits 1 when a run finished none of its requests (its errors were printed as warnings)."""
    for path in (args.out, args.plot):     # before the runs, not after minutes of them
        folder = os.path.dirname(os.path.abspath(path)) if path else ""
        if folder and not os.path.isdir(folder):
            print(f"error: INVALID_ARGUMENT: {path}: the folder {folder} does not exist", file=sys.stderr)
            return 2
    runs = asyncio.run(_bench_async(args))
    print(format_table(runs))
    cmp = format_comparison(runs)
    if cmp:
        print()
        print(cmp)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"runs": runs, "created_at": time.time(), "target": args.target}, f, indent=2, default=_json_default)
        print(f"results written to {args.out}", file=sys.stderr)
    ns = {r["n"] for r in runs}
    if len(ns) > 1 or args.plot:
        path = args.plot or os.path.join(os.path.dirname(os.path.abspath(args.out)) if args.out else ".", "bench_n.png")
        written = plot_runs(runs, path)
        if written:
            print(f"plot written to {written}", file=sys.stderr)
    failed = [f"{r['backend']} n={r['n']}" for r in runs if r["result"].get("num_requests") and not r["result"].get("num_finished")]
    if failed:
        print(f"error: every request failed in {', '.join(failed)} (the warnings above say why)", file=sys.stderr)
        return 1
    return 0


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, float) and math.isnan(o):
        return None
    return str(o)


def results_to_jsonable(results: Sequence[RequestResult]) -> list[dict]:
    return [asdict(r) for r in results]
