"""Start-up warm-up: throwaway steps that compile the eager-step Triton kernels before serving.

Steps with a prefill run outside the CUDA graphs, and their Triton kernels compile one variant per
tile choice (the batch's largest rank, prompt lengths) the first time it is met: about a second
each, which the first requests would otherwise wait on (15% of a first benchmark run on an H100).
"""
from __future__ import annotations

import time

import torch

from server.config import TARGET_MODULES
from server.engine import Engine, EngineStats
from server.lora import LoraWeights
from server.pool import PoolExhausted, stage_adapter
from server.request import Request
from server.sampler import SamplingParams
from server.scheduler import Step
from server.tp import shard_lora


def warm_up(engine: Engine, ranks: tuple[int, ...] = (8, 16, 32, 64, 128),
            prompts: tuple[tuple[int, ...], ...] = ((5,), (40, 3), (200,), (600, 300))) -> float:
    """Run a prefill step and a mixed step per prompt set, base-only and with a temporary
    adapter of each rank (zero weights on every target module), before engine.start().
    Returns the seconds it took; the pool, table, block tables and stats end as they began."""
    t0 = time.perf_counter()
    cfg, pool, table, sched = engine.model.full_cfg, engine.pool, engine.table, engine.scheduler
    params = SamplingParams(max_new_tokens=1 << 20, ignore_eos=True)
    for r in (0,) + tuple(ranks):
        slot = -1
        if r:     # zero weights: only the shapes matter here
            w = {(layer, m): (torch.zeros(r, cfg.module_dims(m)[0]), torch.zeros(cfg.module_dims(m)[1], r))
                 for layer in range(cfg.num_layers) for m in TARGET_MODULES}
            staged = stage_adapter(shard_lora(LoraWeights("warmup", r, r, 1.0, list(TARGET_MODULES), False, w),
                                              cfg, engine.tp), pool)
            if staged.num_pages > pool.free_pages // 2 or table.full:
                continue
            slot = table.insert(staged, None).slot
        for lens in prompts:
            # a prefill step, then a mixed one: as many new prompts beside their decodes
            lens = [min(n, engine.max_model_len - 2) for n in lens]   # (+2: the tokens they sample)
            first, second = ([Request(f"warmup-{k}-{i}", [1 + (j % 7) for j in range(n)], params)
                              for i, n in enumerate(lens)] for k in "ab")
            try:
                for q in first + second:
                    q.slot = slot
                    sched._grow(q, len(q.prompt_ids) + 2)
                engine._run(Step(first, []))
                engine._run(Step(second, first))
            except PoolExhausted:
                pass
            finally:
                for q in first + second:
                    q.slot = -1
                    sched.free(q)
                    engine.block_tables.release(q)
        if slot >= 0:
            table.remove(slot)
    engine.stats = EngineStats()
    if pool.device.type == "cuda":
        torch.cuda.synchronize(pool.device)
    return time.perf_counter() - t0
