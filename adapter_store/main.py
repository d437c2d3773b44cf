"""`loraserve store`: the AdapterStore (+ gRPC health and reflection) in its own process.

The lead's CLI calls add_store_args(parser) and run_store(args). `loraserve serve` instead calls
build_store(...) and add_store_to_server(servicer, server) on the engine's own grpc.aio server.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

import grpc

from clients.cli import parse_with_env
from clients.pb import loraserve_pb2 as pb
from clients.pb import loraserve_pb2_grpc as pb_grpc

from .service import AdapterStoreServicer, build_store
from .validate import Limits

__all__ = ["add_store_args", "run_store", "register_base_model_dir", "limits_from_args", "add_store_to_server", "start_store_server", "SERVER_OPTIONS"]

log = logging.getLogger("loraserve.store")

SERVER_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]

_FLAGS = [
    ("--port", dict(type=int, default=50052, help="gRPC port (env LORASERVE_PORT)")),
    ("--redis-url", dict(default=None, help="redis://host:port/db; unset: start a private redis-server under "
                                            "--data-dir (env LORASERVE_REDIS_URL)")),
    ("--object-store", dict(default=None, help="file:///path or s3://bucket/prefix (endpoint from AWS_ENDPOINT_URL); "
                                               "unset: DATA_DIR/blobs (env LORASERVE_OBJECT_STORE)")),
    ("--data-dir", dict(default="./loraserve-data", help="blobs and private Redis state (env LORASERVE_DATA_DIR)")),
    ("--token", dict(default=None, help="require 'authorization: Bearer TOKEN' on RegisterAdapter/DeleteAdapter "
                                        "(env LORASERVE_TOKEN)")),
    ("--max-adapter-mb", dict(type=int, default=2048, help="largest adapter_model.safetensors accepted, MiB; "
                                                           "larger: RESOURCE_EXHAUSTED (env LORASERVE_MAX_ADAPTER_MB)")),
    ("--max-adapter-rank", dict(type=int, default=256, help="largest LoRA rank accepted; larger: RESOURCE_EXHAUSTED "
                                                          "(env LORASERVE_MAX_ADAPTER_RANK)")),
    ("--workers", dict(type=int, default=1, help="serving processes sharing the port (SO_REUSEPORT). One process "
                                              "streams a few hundred MB/s of adapter weights, bound by its one "
                                              "core; N serve N connections at once (env LORASERVE_WORKERS)")),
    ("--base-model", dict(action="append", default=None, metavar="[NAME=]MODEL_DIR",
                          help="register a base model's dims from its HF config.json (repeatable; engines also "
                               "register theirs at start; env LORASERVE_BASE_MODEL, comma-separated)")),
]


def add_store_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--port, --redis-url, --object-store, --data-dir, --token, ... with their built-in defaults;
    `clients.cli.apply_env_defaults` then takes each from LORASERVE_<FLAG> where that is set.

    Flags the parser already has (e.g. `serve`'s own --port) are left alone.
    """
    have = set(parser._option_string_actions)  # noqa: SLF001 (argparse has no public accessor)
    for flag, kw in _FLAGS:
        if flag in have:
            continue
        parser.add_argument(flag, **kw)
    return parser


def limits_from_args(args) -> Limits:
    """Limits from --max-adapter-mb / --max-adapter-rank (defaults where the parser lacks them)."""
    d = Limits()
    mb = getattr(args, "max_adapter_mb", None)
    rank = getattr(args, "max_adapter_rank", None)
    return Limits(max_rank=min(rank, d.max_rank) if rank else d.max_rank,
                  max_weights_bytes=(mb << 20) if mb else d.max_weights_bytes, max_config_bytes=d.max_config_bytes)


def register_base_model_dir(meta, spec: str) -> tuple[str, str]:
    """'[NAME=]DIR' (DIR holds config.json, or is the config.json): register the model's dims."""
    import pathlib

    from server.config import ModelConfig

    name, _, path = spec.rpartition("=")
    p = pathlib.Path(path)
    cfg = ModelConfig.from_dir(p.parent if p.name == "config.json" else p)
    name = name or cfg.name
    meta.register_base_model(name, cfg.dims_dict())
    return name, str(p)


def add_store_to_server(servicer: AdapterStoreServicer, server: grpc.aio.Server) -> None:
    pb_grpc.add_AdapterStoreServicer_to_server(servicer, server)


async def start_store_server(servicer: AdapterStoreServicer, port: int = 0, host: str = "127.0.0.1",
                             health: bool = True, reuse_port: bool = False) -> tuple[grpc.aio.Server, int]:
    """A started grpc.aio server with AdapterStore (+ health + reflection); returns (server, bound port).
    reuse_port: other processes may bind the same port, and the kernel spreads connections over them."""
    server = grpc.aio.server(options=SERVER_OPTIONS + [("grpc.so_reuseport", 1 if reuse_port else 0)])
    add_store_to_server(servicer, server)
    names = [pb.DESCRIPTOR.services_by_name["AdapterStore"].full_name]
    if health:
        from grpc_health.v1 import health as hl, health_pb2, health_pb2_grpc

        hs = hl.aio.HealthServicer() if hasattr(hl, "aio") else hl.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(hs, server)
        for name in ("", *names):
            res = hs.set(name, health_pb2.HealthCheckResponse.SERVING)
            if asyncio.iscoroutine(res):
                await res
        names.append(health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
    from grpc_reflection.v1alpha import reflection

    reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    await server.start()
    return server, bound


async def _serve(args) -> None:
    redis_proc = None
    redis_url = args.redis_url
    if not redis_url:
        from .services import RedisServer

        redis_proc = RedisServer(persist_dir=os.path.join(args.data_dir, "redis")).start()
        redis_url = redis_proc.url
        log.info("started private redis-server at %s", redis_url)
    servicer = build_store(redis_url, args.object_store, args.data_dir, args.token, limits=limits_from_args(args))
    for spec in getattr(args, "base_model", None) or []:
        name, path = register_base_model_dir(servicer.meta, spec)
        log.info("base model %s registered from %s", name, path)
    servicer.start_sweeper()
    host = getattr(args, "host", None) or "0.0.0.0"
    workers = max(1, getattr(args, "workers", 1) or 1)
    server, port = await start_store_server(servicer, args.port, host, reuse_port=workers > 1)
    # the other serving processes: same Redis and blobs, the port this one bound (also when it was
    # 0); no sweeper or private Redis of their own
    procs = [_spawn_worker(args, redis_url, host, port) for _ in range(workers - 1)]
    log.info("AdapterStore serving on %s:%d (blobs: %s, redis: %s, %d process%s)", host, port, servicer.blobs.url,
             redis_url, workers, "es" if workers > 1 else "")
    try:
        await _until_signalled()
    finally:
        for p in procs:
            p.terminate()
        await server.stop(grace=5)
        servicer.close()
        for p in procs:
            p.join(10)
        if redis_proc is not None:
            redis_proc.close()


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except NotImplementedError:
            pass
    await stop.wait()


def _spawn_worker(args, redis_url: str, host: str, port: int):
    import multiprocessing as mp

    p = mp.get_context("spawn").Process(target=_worker_main, args=(args, redis_url, host, port), daemon=True,
                                        name="loraserve-store-worker")
    p.start()
    return p


def _one_torch_thread() -> None:
    """torch on one thread in each serving process. The store's only torch work is small
    elementwise ops (synthetic weights: a slice of the noise tape times a scale), which torch
    would spread over every core's OpenMP thread; with N serving processes that is N x cores
    spinning threads. On 16 cores, 8 processes so configured moved a quarter of one process's
    bytes while 14.7 cores were busy (benchmarks/results/fetch-store-threads-*). Concurrency
    here comes from requests, not from splitting one multiply."""
    import torch

    torch.set_num_threads(1)


def _worker_main(args, redis_url: str, host: str, port: int) -> None:
    """One more serving process of a --workers N store; it exits with its parent."""
    _one_torch_thread()
    try:   # Linux: SIGTERM when the parent dies, however it dies
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except OSError:
        pass
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def serve() -> None:
        servicer = build_store(redis_url, args.object_store, args.data_dir, args.token, limits=limits_from_args(args))
        server, _ = await start_store_server(servicer, port, host, reuse_port=True)
        try:
            await _until_signalled()
        finally:
            await server.stop(grace=5)
            servicer.close()

    asyncio.run(serve())


def run_store(args: argparse.Namespace) -> None:
    """Serve AdapterStore + health + reflection on args.port until SIGINT/SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _one_torch_thread()
    asyncio.run(_serve(args))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="loraserve store", description="loraserve AdapterStore service")
    add_store_args(p)
    run_store(parse_with_env(p, argv))


if __name__ == "__main__":
    main()
