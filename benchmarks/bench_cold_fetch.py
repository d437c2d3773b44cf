"""A rank-64 adapter of Llama-7B's shape (q, k, v, o in 32 layers: ~134 MB in fp16) through the
control plane, stage by stage, over real gRPC, a real redis-server and the file object store:

  RegisterAdapter (client stream, validation, blob + Redis flip)      -> MB/s
  cold fetch: FetchAdapter stream -> parse + validate -> stage into page images (host cache)
              -> copy into the unified pool (pinned + side stream on CUDA)  -> seconds each

    python benchmarks/bench_cold_fetch.py [--rank 64] [--repeat 3] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

LLAMA7B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    from adapter_store.client import StoreClient
    from adapter_store.service import build_store
    from adapter_store.services import RedisServer
    from adapter_store.synthetic import synthetic_adapter
    from adapter_store.validate import BaseDims, SyntheticParams
    from server.config import ModelConfig
    from server.lora import parse_adapter
    from server.pool import AdapterTable, UnifiedPool, stage_adapter
    from tests.services import StoreThread

    cfg = ModelConfig.from_dict(LLAMA7B, name="llama7b-shape")
    dims = BaseDims(cfg.num_layers, {m: cfg.module_dims(m) for m in cfg.dims_dict()["modules"]}, cfg.name)
    # distinct weights per repeat: the store deduplicates identical blobs by content address
    adapters = [synthetic_adapter(SyntheticParams(args.rank, tuple(args.targets.split(",")), i, 2.0 * args.rank),
                                  dims, cfg.name) for i in range(args.repeat)]
    mb = len(adapters[0][1]) / 1e6
    print(f"adapter: rank {args.rank}, {mb:.1f} MB", flush=True)

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    data = pathlib.Path(tempfile.mkdtemp())
    rows = []
    with RedisServer() as redis:
        servicer = build_store(redis.url, None, str(data))
        from adapter_store.metadata import Metadata
        Metadata(redis.url).register_base_model(cfg.name, cfg.dims_dict())
        store = StoreThread(servicer)
        pool = UnifiedPool(cfg, 2 * 1100, 16, dtype, dev)
        table = AdapterTable(pool, 4)
        try:
            client = StoreClient(store.address)
            for i in range(args.repeat):
                aid = f"r{args.rank}-{i}"
                config_bytes, weight_bytes = adapters[i]
                t0 = time.perf_counter()
                client.register(aid, config_bytes, weight_bytes, base_model=cfg.name)
                t1 = time.perf_counter()
                info, cb, wb = client.fetch(aid)
                t2 = time.perf_counter()
                w = parse_adapter(aid, cb, wb, cfg, dtype)
                t3 = time.perf_counter()
                staged = stage_adapter(w, pool, pin=dev.type == "cuda")
                t4 = time.perf_counter()
                entry = table.insert(staged)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t5 = time.perf_counter()
                table.remove(entry.slot)
                row = {"register_s": t1 - t0, "register_MBps": mb / (t1 - t0), "fetch_s": t2 - t1,
                       "parse_validate_s": t3 - t2, "stage_s": t4 - t3, "pool_copy_s": t5 - t4,
                       "cold_fetch_to_ready_s": t5 - t1}
                rows.append({k: round(v, 3) for k, v in row.items()})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            store.stop()
    best = {k: min(r[k] for r in rows) if not k.endswith("MBps") else max(r[k] for r in rows) for k in rows[0]}
    meta = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (2 cores)",
            "adapter_MB": round(mb, 1), "rank": args.rank, "date": time.strftime("%Y-%m-%d"), "argv": sys.argv}
    print(json.dumps({"best": best, **meta}))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "best": best}, indent=2))


if __name__ == "__main__":
    main()
