"""Assemble an engine from a checkpoint folder: model, pool, adapter tables, scheduler."""
from __future__ import annotations

import logging
import os
import pathlib
from dataclasses import dataclass, field

import torch

from server.adapters import AdapterManager, AdapterSource, LocalSource
from server.engine import Engine
from server.model import LlamaModel
from server.pool import AdapterTable, UnifiedPool
from server.scheduler import SchedulerConfig
from server.tokenizer import Tokenizer

log = logging.getLogger("loraserve.runtime")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class EngineConfig:
    model_dir: str
    dtype: str = "auto"                 # float32 on CPU, bfloat16 on CUDA
    device: str = "auto"
    block_tokens: int = 16
    pool_mb: int = 0                    # 0: auto (CPU 256 MB; CUDA: gpu_memory_utilization)
    pool_pages: int = 0                 # exact page count (tests); overrides pool_mb
    gpu_memory_utilization: float = 0.90
    max_adapters: int = 512             # adapter slots resident in the pool at once
    host_cache_mb: int = 8192
    fetch_workers: int = 8              # concurrent cold fetches (store -> host cache)
    fetch_processes: int = -1           # processes doing their parse/stage work (-1: auto, 0: none)
    cuda_graphs: bool = True            # decode steps replay CUDA graphs (CUDA only)
    max_lora_rank: int = 64             # rank cap of the captured graphs (larger: eager steps)
    adapter_dtype: str = "auto"         # adapter rows in the pool: auto (the model's dtype), int8 or int4
    warmup: bool = True                 # compile eager-step kernels before serving (CUDA only)
    stream_interval: int = 1            # tokens per stream message after the first (Engine)
    sched: SchedulerConfig = field(default_factory=SchedulerConfig)

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        return DTYPES[self.dtype]

    def resolve_adapter_dtype(self, dtype: torch.dtype) -> torch.dtype:
        from server.pool import QUANTIZED
        formats = {"auto": dtype, **QUANTIZED}
        if self.adapter_dtype not in formats:
            raise ValueError(f"--adapter-dtype must be auto, int8 or int4, got {self.adapter_dtype!r}")
        return formats[self.adapter_dtype]


def block_tokens_for(cfg, want: int) -> int:
    """Smallest power-of-two multiple of `want` whose page holds the widest adapter row."""
    widest = max(cfg.hidden_size, cfg.intermediate_size, cfg.q_width)
    b = want
    while b * cfg.kv_width < widest:
        b *= 2
    return b


def build_engine(ec: EngineConfig, source: AdapterSource | None = None, tp=None) -> tuple[Engine, Tokenizer | None]:
    """tp: server.tp.TP for one rank of a tensor-parallel engine (torch.distributed initialized)."""
    device = ec.resolve_device()
    dtype = ec.resolve_dtype(device)
    model = LlamaModel.from_dir(ec.model_dir, dtype, device, tp)
    cfg = model.cfg   # this rank's shapes: the pool holds its KV heads and adapter shards
    B = block_tokens_for(cfg, ec.block_tokens)
    page_bytes = B * cfg.kv_width * torch.tensor([], dtype=dtype).element_size()
    if ec.pool_mb:
        pool_bytes = ec.pool_mb << 20
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        # leave room for activations: logits of a full prefill budget plus a few hidden buffers
        act = ec.sched.max_prefill_tokens * (cfg.vocab_size * 4 + cfg.intermediate_size * 8 + cfg.hidden_size * 16)
        pool_bytes = int(free - total * (1 - ec.gpu_memory_utilization) - act)
    else:
        pool_bytes = 256 << 20
    num_pages = ec.pool_pages or max(pool_bytes // page_bytes, 2 * cfg.num_layers)
    pool = UnifiedPool(cfg, num_pages, B, dtype, device, ec.resolve_adapter_dtype(dtype))
    max_tokens = num_pages // (2 * cfg.num_layers) * B
    ec.sched.max_model_len = min(ec.sched.max_model_len, cfg.max_position_embeddings, max_tokens)
    if cfg.sliding_window and ec.sched.max_model_len > cfg.sliding_window:
        # within its window, sliding-window attention is full attention: serve sequences that fit
        # it rather than compute what the model does not (the kernels attend to every position)
        log.warning("the model attends within a sliding window of %d tokens: sequences are capped at it "
                    "(--max-model-len %d)", cfg.sliding_window, ec.sched.max_model_len)
        ec.sched.max_model_len = cfg.sliding_window
    table = AdapterTable(pool, ec.max_adapters)
    procs = ec.fetch_processes
    if procs < 0:   # auto: worth its start-up cost where adapters are many and large, on GPUs
        procs = min(8, max(1, (os.cpu_count() or 2) // 2)) if device.type == "cuda" else 0
    adapters = AdapterManager(pool, table, source or LocalSource(), model.full_cfg, ec.host_cache_mb << 20,
                              ec.fetch_workers, model.tp, fetch_processes=procs)
    graphs = ec.cuda_graphs and device.type == "cuda" and not model.tp.enabled
    if ec.sched.prefill_interval < 0:   # auto: batch admissions where decode steps replay graphs
        ec.sched.prefill_interval = 10 if graphs else 1
    engine = Engine(model, pool, table, adapters, ec.sched, ec.stream_interval)
    if graphs:
        engine.capture_graphs(min(ec.sched.max_num_seqs, 256), ec.max_lora_rank)
    if ec.warmup and device.type == "cuda" and not model.tp.enabled:
        from server.warmup import warm_up
        log.info("warm-up steps took %.1f s", warm_up(engine))
    log.info("engine ready: model=%s device=%s dtype=%s pages=%d x %d KB (block %d tokens, %d tokens of KV)",
             cfg.name, device, str(dtype).removeprefix("torch."), pool.num_pages, page_bytes >> 10, B, max_tokens)
    return engine, Tokenizer.from_dir(ec.model_dir)
