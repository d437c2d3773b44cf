"""RegisterAdapter throughput: a rank-64 Llama-7B-shape attention adapter (~134 MB fp16, 32 layers x
q,k,v,o) streamed over real gRPC into a separate `loraserve store` process (FileStore + Redis).

    python -m adapter_store.bench_register [--n 5] [--rank 64] [--object-store file:///tmp/x] [--fetch]

Each registration is timed from the first message sent to the AdapterInfo received: the gRPC
stream, size checks, full validation (safetensors parse, shapes, finite values, sha256), the
blob write (fsync'd) and the Redis commit. Adapters differ (different seeds), so no blob is
deduplicated.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=5, help="registrations to time")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--object-store", default=None, help="default: a FileStore in a temp dir")
    p.add_argument("--chunk-mib", type=float, default=1.0)
    p.add_argument("--warmup", type=int, default=1, help="untimed registrations first (the store process warms up)")
    p.add_argument("--fetch", action="store_true", help="also time FetchAdapter of each")
    args = p.parse_args(argv)

    import grpc
    from server.config import ModelConfig

    from adapter_store.client import StoreClient
    from adapter_store.metadata import Metadata
    from adapter_store.services import RedisServer, free_port
    from adapter_store.synthetic import synthetic_adapter
    from adapter_store.validate import BaseDims, validate_synthetic

    llama7b = ModelConfig(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32,
                          head_dim=128, vocab_size=32000, name="llama-2-7b-shape")
    dims = BaseDims.from_dict(llama7b.dims_dict(), llama7b.name)
    t0 = time.perf_counter()
    conf, base_weights = synthetic_adapter(validate_synthetic(args.rank, args.targets.split(","), 0, 0, dims), dims)
    gen_s = time.perf_counter() - t0
    size = len(base_weights)

    def variant(i: int) -> bytes:
        # a distinct blob per registration: flip low mantissa bits of the last element (stays finite)
        w = bytearray(base_weights)
        w[-2] ^= (i + 1) & 0xFF
        w[-3] ^= ((i + 1) >> 8) & 0xFF
        return bytes(w)
    print(f"adapter: rank {args.rank}, {args.targets}, {size / 1e6:.1f} MB safetensors "
          f"(synthetic generation {gen_s:.2f} s each)")

    with tempfile.TemporaryDirectory(prefix="loraserve-bench-") as tmp, RedisServer() as redis_srv:
        Metadata(redis_srv.url).register_base_model(llama7b.name, llama7b.dims_dict())
        port = free_port()
        cmd = [sys.executable, "-m", "adapter_store.main", "--port", str(port), "--redis-url", redis_srv.url,
               "--data-dir", tmp]
        if args.object_store:
            cmd += ["--object-store", args.object_store]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
        log_path = os.path.join(tmp, "store.log")
        logf = open(log_path, "wb")
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT)
        try:
            ch = grpc.insecure_channel(f"127.0.0.1:{port}")
            grpc.channel_ready_future(ch).result(timeout=60)
            ch.close()
            client = StoreClient(f"127.0.0.1:{port}")
            times, ftimes = [], []
            for i in range(args.warmup):
                client.register(f"warmup-{i}", conf, variant(10_000 + i), base_model=llama7b.name)
            for i in range(args.n):
                weights = variant(i)
                t = time.perf_counter()
                info = client.register(f"bench-{i}", conf, weights, base_model=llama7b.name,
                                       chunk_bytes=int(args.chunk_mib * (1 << 20)))
                times.append(time.perf_counter() - t)
                assert info.size_bytes == len(weights)
                if args.fetch:
                    t = time.perf_counter()
                    _, _, w = client.fetch(f"bench-{i}")
                    ftimes.append(time.perf_counter() - t)
                    assert len(w) == len(weights)
            client.close()
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            logf.close()
            breakdown = [ln[ln.index("registered adapter"):] for ln in open(log_path, errors="replace")
                         if "registered adapter bench-" in ln]
    med = statistics.median(times)
    print(f"RegisterAdapter: {args.n} x {size / 1e6:.1f} MB, median {med:.3f} s -> {size / med / 1e6:.0f} MB/s "
          f"(best {size / min(times) / 1e6:.0f} MB/s, worst {size / max(times) / 1e6:.0f} MB/s)")
    for ln in breakdown:
        print("  store:", ln.rstrip())
    if ftimes:
        fmed = statistics.median(ftimes)
        print(f"FetchAdapter:    median {fmed:.3f} s -> {size / fmed / 1e6:.0f} MB/s")
    print("command: python -m adapter_store.bench_register " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))


if __name__ == "__main__":
    main()
