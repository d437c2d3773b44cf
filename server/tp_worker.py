"""Ranks 1..N-1 of a tensor-parallel `loraserve serve`: each builds its shard of the engine and
follows rank 0's broadcasts until rank 0 stops. Rank 0 is the serving process itself."""
from __future__ import annotations

import datetime
import logging
import os

log = logging.getLogger("loraserve.tp")


def init_rank(rank: int, world: int, port: int, device: str):
    """Join the process group (NCCL on CUDA, gloo on the CPU) and return this rank's TP and device."""
    import torch
    import torch.distributed as dist

    from server.tp import TP

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")   # never NVLink multicast (shared hosts)
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    dev = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(days=1))
    # adapter readiness and request broadcasts are small host objects: a gloo group for them
    cpu_group = dist.new_group(backend="gloo") if cuda else None
    return TP(rank, world, None, cpu_group), dev, cpu_group


def run(rank: int, world: int, port: int, ec, local_adapters: dict[str, str], store_target: str | None,
        token: str | None) -> None:
    from server.adapters import ChainSource, LocalSource
    from server.lora import load_peft_dir
    from server.runtime import build_engine

    tp, dev, _ = init_rank(rank, world, port, ec.device)
    ec.device = dev
    source = None
    if store_target:
        from server.store_link import StoreSource
        source = StoreSource.connect(store_target, token)
    engine, _ = build_engine(ec, ChainSource(LocalSource(local_adapters), source), tp=tp)
    for name, path in local_adapters.items():
        engine.adapters.add_weights(load_peft_dir(name, path, engine.cfg, engine.pool.dtype))
    engine.start()
    engine._thread.join()
    log.info("rank %d stopped", rank)
