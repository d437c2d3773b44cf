"""The engine thread's scheduling cost per step against the number of adapters, on the CPU.

The real Scheduler, AdapterManager, UnifiedPool and AdapterTable run S-LoRA's workload (the same
trace `loraserve bench` sends: power-law adapters, gamma arrivals, lengths in [8, 512)). A step
is simulated: every scheduled request gains its token at once, and a request ends at its output
length. Every adapter is already in the host cache, as `WARM=1` leaves it. The model has
Llama-7B's layer count and ranks and a narrow width (--hidden), so that the row table, the
per-layer index and the page counts match a Llama-7B adapter's while the copies stay small.
The figure is the time schedule() takes per step, and what it spends it on
(--profile: cProfile's top entries).

    python benchmarks/bench_scheduler.py --n 5,2000 --ranks 64,32,16,8 [--profile 12] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))


def run(n: int, args) -> dict:
    from clients.workload import WorkloadSpec, generate_workload, synthetic_adapter_ids
    from server.adapters import AdapterManager, LocalSource
    from server.config import ModelConfig
    from server.lora import LoraWeights
    from server.pool import AdapterTable, UnifiedPool, stage_adapter
    from server.request import Request
    from server.sampler import SamplingParams
    from server.scheduler import Scheduler, SchedulerConfig

    h = args.hidden
    cfg = ModelConfig(hidden_size=h, intermediate_size=2 * h, num_layers=32, num_heads=4, num_kv_heads=4,
                      head_dim=h // 4, vocab_size=256)
    pool = UnifiedPool(cfg, args.pages, 16, torch.float16, "cpu")
    table = AdapterTable(pool, args.max_adapters)
    mgr = AdapterManager(pool, table, LocalSource(), cfg, host_cache_bytes=64 << 30, fetch_workers=1)
    sched = Scheduler(SchedulerConfig(max_num_seqs=256, max_prefill_tokens=4096, max_model_len=4096,
                                      prefill_interval=args.prefill_interval), pool, mgr)
    spec = WorkloadSpec(num_adapters=n, alpha=1.0, req_rate=args.rate, cv=1.0, duration=args.duration, seed=42)
    trace = generate_workload(spec, synthetic_adapter_ids(n))
    ranks = [int(r) for r in args.ranks.split(",")]
    targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    g = torch.Generator().manual_seed(0)
    staged: dict = {}
    used = sorted({r.adapter_id for r in trace})
    for aid in used:      # staged once per rank, shared by ids
        r = ranks[int(aid.split("-")[1]) % len(ranks)]
        if r not in staged:
            w = {(l, m): (torch.randn(r, h, generator=g), torch.randn(h, r, generator=g))
                 for l in range(cfg.num_layers) for m in targets}
            staged[r] = stage_adapter(LoraWeights(f"r{r}", r, r, 1.0, list(targets), False, w), pool)
        mgr.put_host(aid, 0, staged[r])
    pending = sorted(trace, key=lambda q: q.timestamp)
    clock, k, steps, sched_s, done = 0.0, 0, 0, 0.0, 0
    prof = None
    if args.profile:
        import cProfile
        prof = cProfile.Profile()
    loads0 = mgr.loads
    while done < len(trace):
        while k < len(pending) and pending[k].timestamp <= clock:
            q = pending[k]
            sched.add(Request(f"r{q.index}", [5] * q.input_len, SamplingParams(max_new_tokens=q.output_len, ignore_eos=True),
                              q.adapter_id))
            k += 1
        t0 = time.perf_counter()
        if prof is not None:
            prof.enable()
        step = sched.schedule()
        if prof is not None:
            prof.disable()
        sched_s += time.perf_counter() - t0
        steps += 1
        clock += args.step_ms / 1e3
        for req in step.prefills + step.decodes:      # the step: one token each, at once
            req.num_computed = req.total_len
            req.output_ids.append(7)
            if len(req.output_ids) >= req.params.max_new_tokens:
                sched.remove(req)
                done += 1
    row = {"n": n, "requests": len(trace), "distinct_adapters": len(used), "steps": steps,
           "sched_ms_per_step": round(sched_s / steps * 1e3, 3), "loads": mgr.loads - loads0,
           "evictions": mgr.evictions}
    if prof is not None:
        import io
        import pstats
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.profile)
        row["profile"] = out.getvalue()
    mgr.close()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="5,2000")
    ap.add_argument("--ranks", default="64,32,16,8")
    ap.add_argument("--rate", type=float, default=40.0)
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--step-ms", type=float, default=22.0, help="simulated time per step (the H200's S2 step)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--pages", type=int, default=600_000)
    ap.add_argument("--max-adapters", type=int, default=512)
    ap.add_argument("--prefill-interval", type=int, default=10)
    ap.add_argument("--profile", type=int, default=0, metavar="ROWS")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for n in [int(x) for x in args.n.split(",")]:
        row = run(n, args)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
        if row.get("profile"):
            print(row["profile"])
    if args.out:
        meta = {"date": time.strftime("%Y-%m-%d"), "device": "cpu", "argv": sys.argv}
        pathlib.Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
