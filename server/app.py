"""`loraserve serve`: the engine (and, embedded, the adapter store) on one gRPC port."""
from __future__ import annotations

import argparse
import asyncio
import logging
import pathlib
import signal
import sys

import grpc

from clients.cli import parse_with_env
from clients.pb import loraserve_pb2 as pb
from clients.pb import loraserve_pb2_grpc as pb_grpc

log = logging.getLogger("loraserve.serve")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The serve flags with their built-in defaults; `clients.cli.apply_env_defaults` then takes
    each default from LORASERVE_<FLAG> where that is set (one place that converts and reports
    bad values)."""
    p.add_argument("--model", default=None,
                   help="Hugging Face checkpoint folder (config.json, *.safetensors, optional tokenizer.json); "
                        "default: a tiny demo model built under --data-dir")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="weights, KV cache and adapters (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--device", default="auto", help="cuda, cuda:1, cpu (auto: cuda if present)")
    p.add_argument("--data-dir", default=str(pathlib.Path.home() / ".loraserve"),
                   help="where the embedded store keeps blobs and state, and the demo model lives")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a local PEFT folder to register at start (repeatable)")
    p.add_argument("--redis-url", default=None,
                   help="external Redis for adapter metadata; default: a private redis-server child")
    p.add_argument("--object-store", default=None,
                   help="file:///path or s3://bucket/prefix (endpoint from AWS_ENDPOINT_URL); default: DATA_DIR/blobs")
    p.add_argument("--advertise-address", default=None, metavar="HOST:PORT",
                   help="where clients reach this engine, as its heartbeat tells routers (default: --host:--port, "
                        "with 0.0.0.0 replaced by this machine's name)")
    p.add_argument("--store-target", default=None,
                   help="host:port of a separate adapter store (engine-only mode; no embedded store)")
    p.add_argument("--no-store", action="store_true", default=False,
                   help="serve only --adapter folders: no Redis, no object storage")
    p.add_argument("--token", default=None,
                   help="control-plane bearer token required for RegisterAdapter/DeleteAdapter")
    p.add_argument("--pool-mb", type=int, default=0,
                   help="unified pool size (0: auto from --gpu-memory-utilization; 256 MB on CPU)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--block-tokens", type=int, default=16, help="tokens per KV page")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-prefill-tokens", type=int, default=4096)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-adapters", type=int, default=512,
                   help="adapter slots resident in the GPU pool at once")
    p.add_argument("--host-cache-mb", type=int, default=8192,
                   help="host memory cache for adapters (LRU by bytes)")
    p.add_argument("--fetch-workers", type=int, default=8,
                   help="concurrent cold adapter fetches from the store into the host cache")
    p.add_argument("--fetch-processes", type=int, default=-1,
                   help="processes that parse, validate and stage cold adapters (-1: auto, 8 on GPUs, "
                        "none on CPUs; 0: threads only)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="shard the model over N GPUs of this host (N processes; gloo on the CPU)")
    p.add_argument("--prefill-interval", type=int, default=-1,
                   help="admit new prefills at most every N steps while others decode (S-LoRA/lightllm's "
                        "max_wait_tokens); a full prefill budget waiting admits at once. -1 (default): 10 on "
                        "CUDA, where prefill steps run outside the CUDA graphs; 1 on the CPU")
    p.add_argument("--stream-interval", type=int, default=1,
                   help="send a request's tokens this many per message (its first and last at once): fewer "
                        "messages for the servicers' event loop, which shares the GIL with the engine thread")
    p.add_argument("--admission", default="peak", choices=["peak", "optimistic"],
                   help="peak: S-LoRA's rule, never over-commit; optimistic: admit what fits now, preempt later")
    p.add_argument("--no-cuda-graphs", action="store_true", default=False,
                   help="run decode steps eagerly instead of replaying CUDA graphs")
    p.add_argument("--no-warmup", action="store_true", default=False,
                   help="skip the start-up steps that compile the eager-step Triton kernels (CUDA); they then "
                        "compile during the first requests instead")
    p.add_argument("--max-lora-rank", type=int, default=64,
                   help="rank cap of the captured decode graphs (batches with larger ranks run eagerly)")
    p.add_argument("--adapter-dtype", default="auto", choices=["auto", "int8", "int4"],
                   help="adapter rows in the GPU pool: auto (the model's dtype), int8 with a scale per row, "
                        "which halves the bytes a step over many adapters reads (and the host cache's), or int4 "
                        "(two weights a byte, a scale per row), which halves them again; outputs then differ "
                        "from PEFT's within the quantization error (int4: ~11%% of each weight's rms)")
    p.add_argument("--log-level", default="warning")


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.WARNING), stream=sys.stderr,
                        format='ts=%(asctime)s level=%(levelname)s logger=%(name)s msg="%(message)s"')


def _parse_adapters(items: list[str]) -> dict[str, str]:
    out = {}
    for it in items:
        name, sep, path = it.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"error: --adapter takes NAME=DIR, got {it!r}")
        out[name] = path
    return out


class Running:
    """A started server: its port, engine and a coroutine to stop it all."""

    def __init__(self, server, engine, port: int, cleanup: list):
        self.server, self.engine, self.port, self._cleanup = server, engine, port, cleanup

    async def stop(self, grace: float = 5) -> None:
        await self.server.stop(grace=grace)
        _run_cleanup(self._cleanup)


def _run_cleanup(cleanup: list) -> None:
    for fn in reversed(cleanup):
        try:
            fn()
        except Exception:
            log.exception("cleanup failed")


def _check_args(args) -> None:
    """Values no server can run with, refused before anything starts."""
    for flag, least in (("pool_mb", 0), ("host_cache_mb", 0), ("block_tokens", 1), ("max_num_seqs", 1),
                        ("max_prefill_tokens", 1), ("max_model_len", 2), ("max_adapters", 1),
                        ("fetch_workers", 1), ("tensor_parallel_size", 1), ("stream_interval", 1),
                        ("max_lora_rank", 0)):
        if getattr(args, flag) < least:
            raise SystemExit(f"error: --{flag.replace('_', '-')} must be {least} or more, got {getattr(args, flag)}")
    if not 0 < args.gpu_memory_utilization <= 1:
        raise SystemExit(f"error: --gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}")


async def start(args) -> Running:
    """Build and start everything; a failure part-way stops what had started (the private
    redis-server child, the engine thread, tensor-parallel workers) before it propagates."""
    _check_args(args)
    cleanup: list = []
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20),
                                      ("grpc.max_send_message_length", 64 << 20),
                                      # gRPC sets SO_REUSEPORT by default: a second server on a
                                      # busy port would start and take half the connections
                                      ("grpc.so_reuseport", 0)])
    try:
        return await _start(args, server, cleanup)
    except BaseException:
        await server.stop(None)
        _run_cleanup(cleanup)
        raise


async def _start(args, server, cleanup: list) -> Running:
    from server.adapters import ChainSource, LocalSource
    from server.lora import load_peft_dir
    from server.runtime import EngineConfig, build_engine
    from server.scheduler import SchedulerConfig
    from server.servicer import EngineAdminServicer, InferenceServicer

    data_dir = pathlib.Path(args.data_dir).expanduser()
    data_dir.mkdir(parents=True, exist_ok=True)
    model_dir = args.model
    if not model_dir:
        from server.demo import ensure_demo_model
        model_dir = str(ensure_demo_model(data_dir))
    local = _parse_adapters(args.adapter)

    try:
        bound = server.add_insecure_port(f"{args.host}:{args.port}")
    except RuntimeError:      # grpc raises where older releases returned 0
        bound = 0
    if bound == 0:
        raise SystemExit(f"error: cannot bind {args.host}:{args.port} (is another server on that port?)")
    store_source, store_servicer, store_meta = None, None, None
    if not args.no_store:
        store_source, store_servicer, store_meta = _setup_store(args, data_dir, bound, cleanup)

    sched = SchedulerConfig(max_num_seqs=args.max_num_seqs, max_prefill_tokens=args.max_prefill_tokens,
                            max_model_len=args.max_model_len, admission=args.admission,
                            prefill_interval=args.prefill_interval)
    ec = EngineConfig(model_dir, dtype=args.dtype, device=args.device, block_tokens=args.block_tokens,
                      pool_mb=args.pool_mb, gpu_memory_utilization=args.gpu_memory_utilization,
                      max_adapters=args.max_adapters, host_cache_mb=args.host_cache_mb, sched=sched,
                      cuda_graphs=not args.no_cuda_graphs, warmup=not args.no_warmup,
                      max_lora_rank=args.max_lora_rank, adapter_dtype=args.adapter_dtype,
                      fetch_workers=args.fetch_workers, fetch_processes=args.fetch_processes,
                      stream_interval=args.stream_interval)
    tp = None
    if args.tensor_parallel_size > 1:
        tp = _start_tp_workers(args, ec, local, bound, cleanup)
    engine, tok = build_engine(ec, ChainSource(LocalSource(local), store_source), tp=tp)
    cfg = engine.cfg
    for name, path in local.items():   # validate now: a bad folder fails start-up, not a request
        engine.adapters.add_weights(load_peft_dir(name, path, cfg, engine.pool.dtype))
    engine.start()
    cleanup.append(engine.stop)

    inference = InferenceServicer(engine, tok)
    pb_grpc.add_InferenceServicer_to_server(inference, server)
    pb_grpc.add_EngineAdminServicer_to_server(EngineAdminServicer(engine, inference, cfg.name), server)
    names = [pb.DESCRIPTOR.services_by_name[n].full_name for n in ("Inference", "EngineAdmin")]
    if store_servicer is not None:
        pb_grpc.add_AdapterStoreServicer_to_server(store_servicer, server)
        names.append(pb.DESCRIPTOR.services_by_name["AdapterStore"].full_name)
    _add_health_and_reflection(server, names)
    await server.start()
    if store_meta is not None:
        await asyncio.to_thread(store_meta, engine, bound, cleanup)
        if local:
            from server.store_link import register_local_adapters
            asyncio.get_running_loop().run_in_executor(
                None, register_local_adapters, f"127.0.0.1:{bound}" if not args.store_target else args.store_target,
                args.token, cfg.name, local)
    return Running(server, engine, bound, cleanup)


async def serve_async(args) -> None:
    running = await start(args)
    e = running.engine
    print(f"loraserve: serving {e.cfg.name} on {args.host}:{running.port} "
          f"(device {e.model.device}, {e.pool.num_pages} pool pages)", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await running.stop()


def _start_tp_workers(args, ec, local: dict[str, str], port: int, cleanup: list):
    """Spawn ranks 1..N-1 (server/tp_worker.py) and join the group as rank 0."""
    import copy
    import multiprocessing as mp

    from adapter_store.services import free_port
    from server import tp_worker

    world, tp_port = args.tensor_parallel_size, free_port()
    store = args.store_target or (None if args.no_store else f"127.0.0.1:{port}")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=tp_worker.run, args=(r, world, tp_port, copy.deepcopy(ec), local, store, args.token),
                         daemon=True) for r in range(1, world)]
    for p in procs:
        p.start()
    tp, dev, _ = tp_worker.init_rank(0, world, tp_port, ec.device)
    ec.device = dev

    def stop_workers():
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    cleanup.insert(0, stop_workers)   # after the engine's stop has been broadcast
    return tp


def _add_health_and_reflection(server, names: list[str]) -> None:
    try:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        hs = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(hs, server)
        for n in ["", *names]:
            r = hs.set(n, health_pb2.HealthCheckResponse.SERVING)
            if asyncio.iscoroutine(r):
                asyncio.ensure_future(r)
        names = names + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
    except Exception as e:   # not installed, or built for another protobuf runtime
        log.warning("no health service (grpcio-health-checking: %s)", e)
    try:
        from grpc_reflection.v1alpha import reflection
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)
    except Exception as e:
        log.warning("no server reflection (grpcio-reflection: %s)", e)


def _setup_store(args, data_dir: pathlib.Path, port: int, cleanup: list):
    """The adapter store: embedded (same port) or remote (--store-target)."""
    from server.store_link import StoreSource

    if args.store_target:
        source = StoreSource.connect(args.store_target, args.token)
        return source, None, _engine_registration(args, source.client)
    from adapter_store.service import build_store
    from adapter_store.services import RedisServer

    redis_url = args.redis_url
    if not redis_url:     # a private redis-server child, persisting under the data dir
        proc = RedisServer(persist_dir=data_dir / "redis").start()
        cleanup.append(proc.stop)
        redis_url = proc.url
    servicer = build_store(redis_url, args.object_store, str(data_dir), args.token)
    servicer.start_sweeper()       # orphan blobs of crashed registrations, hourly
    cleanup.append(servicer.close)
    source = StoreSource.connect(f"127.0.0.1:{port}", args.token)
    args.redis_url = redis_url
    return source, servicer, _engine_registration(args, source.client)


def _engine_registration(args, client):
    """After the server listens: tell the store our base model, follow delete/replace events
    and heartbeat our resident set (server/store_link.py)."""
    def attach(engine, port, cleanup):
        from server.store_link import attach_engine
        attach_engine(engine, args, port, cleanup)
    return attach


def serve(args) -> None:
    setup_logging(args.log_level)
    try:
        asyncio.run(serve_async(args))
    except KeyboardInterrupt:
        pass


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="loraserve serve")
    add_serve_args(p)
    serve(parse_with_env(p, argv))


if __name__ == "__main__":
    main()
