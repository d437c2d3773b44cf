"""Cold-fetch throughput of the engine's adapter path, the bottleneck of S-LoRA's large-n runs:
N synthetic adapters of Llama-7B's shape (ranks cycling --ranks; q,k,v,o) go store -> FetchAdapter
-> parse + validate -> stage into page images (the host cache), with W fetch workers. The store runs
as its own process (`loraserve store`), as in benchmarks/slora_headline.sh.

    python benchmarks/bench_fetch_throughput.py --n 24 --workers 1,4,8 --ranks 8
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from benchmarks.bench_cold_fetch import LLAMA7B  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--workers", default="1,4,8")
    ap.add_argument("--ranks", default="8")
    ap.add_argument("--processes", type=int, default=0, help="fetch worker processes (0: threads only)")
    ap.add_argument("--store-workers", type=int, default=1, help="the store's serving processes (loraserve store --workers)")
    ap.add_argument("--busy", action="store_true",
                    help="run a thread that keeps the GIL busy with small torch ops, as the engine's step loop does")
    ap.add_argument("--switch-interval", type=float, default=None, help="sys.setswitchinterval (s)")
    ap.add_argument("--device", default="cpu",
                    help="the pool's device: on cuda the host cache pins its images, as the engine's does")
    ap.add_argument("--adapter-dtype", choices=["float16", "int8"], default="float16")
    ap.add_argument("--out")
    args = ap.parse_args()
    from adapter_store.client import StoreClient
    from adapter_store.metadata import Metadata
    from adapter_store.services import RedisServer, free_port
    from server.adapters import AdapterManager
    from server.config import ModelConfig
    from server.pool import AdapterTable, UnifiedPool
    from server.store_link import StoreSource

    cfg = ModelConfig.from_dict(LLAMA7B, name="llama7b-shape")
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    stop_busy = threading.Event()
    if args.busy:
        def busy():
            x = torch.zeros(64)
            while not stop_busy.is_set():
                for _ in range(200):       # Python-heavy host work between short GIL releases
                    x = x + 1
        threading.Thread(target=busy, daemon=True).start()
    ranks = [int(r) for r in args.ranks.split(",")]
    rows = []
    with RedisServer() as redis:
        Metadata(redis.url).register_base_model(cfg.name, cfg.dims_dict())
        port = free_port()
        store = subprocess.Popen([sys.executable, "-m", "adapter_store.main", "--port", str(port), "--redis-url",
                                  redis.url, "--data-dir", tempfile.mkdtemp(), "--workers", str(args.store_workers)],
                                 stderr=subprocess.DEVNULL)
        try:
            client = StoreClient(f"127.0.0.1:{port}")
            from adapter_store.client import AdapterNotFound
            for _ in range(150):          # until the store answers
                try:
                    client.get("probe")
                except AdapterNotFound:
                    break
                except Exception:
                    time.sleep(0.2)
            for w in [int(x) for x in args.workers.split(",")]:
                ids = [f"w{w}-{i}" for i in range(args.n)]
                for i, aid in enumerate(ids):
                    client.register_synthetic(aid, ranks[i % len(ranks)], ["q_proj", "k_proj", "v_proj", "o_proj"],
                                              seed=1000 * w + i, base_model=cfg.name)
                pool = UnifiedPool(cfg, 4, 16, torch.float16, args.device, getattr(torch, args.adapter_dtype))
                mgr = AdapterManager(pool, AdapterTable(pool, 4), StoreSource.connect(f"127.0.0.1:{port}"), cfg,
                                     host_cache_bytes=64 << 30, fetch_workers=w, fetch_processes=args.processes)
                if args.processes:   # start the workers outside the timed window
                    list(mgr._procs.map(abs, range(args.processes)))
                c0, s0, t0 = os.times(), _cpu_s(store.pid), time.perf_counter()
                for aid in ids:
                    mgr.prefetch(aid)
                while not all(mgr.ready(a) or mgr.has_failed(a) for a in ids):
                    time.sleep(0.01)
                dt, c1, s1 = time.perf_counter() - t0, os.times(), _cpu_s(store.pid)
                failed = sum(mgr.has_failed(a) for a in ids)
                mb = sum(s.nbytes for _, s in mgr._host.values()) / 1e6
                rows.append({"workers": w, "adapters": args.n, "failed": failed, "seconds": round(dt, 2),
                             "adapters_per_s": round(args.n / dt, 2), "MB_per_s": round(mb / dt, 1),
                             "engine_cpu_s_per_adapter": round((c1.user + c1.system - c0.user - c0.system) / args.n, 3),
                             # the store is one process: near 1.0 here, it is what bounds the fetches
                             "store_cores_busy": round((s1 - s0) / dt, 2)})
                print(json.dumps(rows[-1]), flush=True)
                mgr.close()
        finally:
            store.terminate()
            store.wait()
    stop_busy.set()
    meta = {"pool_device": args.device, "adapter_dtype": args.adapter_dtype, "processes": args.processes, "store_workers": args.store_workers, "busy": args.busy, "switch_interval": sys.getswitchinterval(), "device": f"cpu ({os.cpu_count()} cores)", "ranks": ranks, "date": time.strftime("%Y-%m-%d"), "argv": sys.argv}
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process and its child processes have used so far (Linux /proc)."""
    def one(p: int) -> float:
        fields = pathlib.Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    kids = pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return one(pid) + sum(one(int(k)) for k in kids)


if __name__ == "__main__":
    main()
