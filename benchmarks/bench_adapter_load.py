"""Host time of one adapter load into the pool (AdapterTable.insert) and one eviction
(AdapterTable.remove) on a GPU, with the device idle and behind ~35 ms of queued matmuls, at
Llama-7B's shape with the pool filling most of the GPU (as in the S2 headline at n = 2000, where
a load comes every second step). Any wait for the device shows up as tens of milliseconds.

    python benchmarks/bench_adapter_load.py [GPU_FRACTION]   (default 0.9)
"""
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from benchmarks.bench_engine import SHAPES, random_adapter  # noqa: E402
from server.config import ModelConfig  # noqa: E402
from server.pool import AdapterTable, UnifiedPool, stage_adapter  # noqa: E402


def main() -> None:
    cfg = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "rms_norm_eps": 1e-5, **SHAPES["llama7b"]},
                                name="llama7b")
    dev = torch.device("cuda")
    w = torch.randn(8192, 8192, device=dev, dtype=torch.float16)
    free, total = torch.cuda.mem_get_info()
    frac = float(sys.argv[1]) if len(sys.argv) > 1 else 0.9
    page_bytes = 16 * 4096 * 2
    pages = int((free - total * (1 - frac)) // page_bytes)
    pool = UnifiedPool(cfg, pages, 16, torch.float16, dev)
    table = AdapterTable(pool, 512)
    staged = [stage_adapter(random_adapter(cfg, r, ["q_proj", "k_proj", "v_proj", "o_proj"], i), pool, pin=True)
              for i, r in enumerate([64, 32, 16, 8])]
    side = torch.cuda.Stream()
    print(f"pool {pages} pages; free after pool {torch.cuda.mem_get_info()[0]/1e9:.2f} GB", flush=True)
    entries = [table.insert(staged[i % 4], side) for i in range(200)]    # resident adapters
    torch.cuda.synchronize()

    def busy():
        for _ in range(20):
            w @ w
    for mode in ("idle", "busy"):
        ins, rem = [], []
        for i in range(60):
            if mode == "busy":
                busy()
            t0 = time.perf_counter()
            table.remove(entries.pop(0).slot)
            t1 = time.perf_counter()
            entries.append(table.insert(staged[i % 4], side))
            t2 = time.perf_counter()
            rem.append(t1 - t0)
            ins.append(t2 - t1)
            torch.cuda.current_stream().wait_event(entries[-1].copied)
        torch.cuda.synchronize()
        ins.sort()
        rem.sort()
        print(f"{mode}: insert median {ins[30]*1e3:.3f} ms p90 {ins[54]*1e3:.3f} max {ins[-1]*1e3:.3f}; "
              f"remove median {rem[30]*1e3:.3f} ms p90 {rem[54]*1e3:.3f} max {rem[-1]*1e3:.3f}", flush=True)
    # what the two fixes rest on: assigning a Python number to a CUDA tensor element waits for the device
    x = torch.zeros(512, device=dev)
    for how in ("setitem", "fill_"):
        ts = []
        for i in range(20):
            busy()
            t0 = time.perf_counter()
            if how == "setitem":
                x[i] = 0.5
            else:
                x[i:i + 1].fill_(0.5)
            ts.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        ts.sort()
        print(f"x[i] = 0.5 via {how}: median {ts[10]*1e3:.3f} ms behind a queued ~35 ms of matmuls", flush=True)


if __name__ == "__main__":
    main()
