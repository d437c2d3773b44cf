import importlib.util, sys, time, torch
torch.set_num_threads(1)
sys.path.insert(0, '/work/main')
def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path); m = importlib.util.module_from_spec(spec); sys.modules[name] = m; spec.loader.exec_module(m); return m
old_pool = load("old_pool", "/tmp/old/server/pool.py"); old_lora = load("old_lora", "/tmp/old/server/lora.py")
from server import pool as new_pool, lora as new_lora
from benchmarks.bench_cold_fetch import LLAMA7B
from server.config import ModelConfig
from adapter_store.synthetic import synthetic_adapter
from adapter_store.validate import BaseDims, SyntheticParams
cfg = ModelConfig.from_dict(LLAMA7B, name="llama7b-shape")
dims = BaseDims(cfg.num_layers, {m: cfg.module_dims(m) for m in cfg.dims_dict()["modules"]}, cfg.name)
cb, wb = synthetic_adapter(SyntheticParams(64, ("q_proj","k_proj","v_proj","o_proj"), 1, 1.0), dims, cfg.name)
w = new_lora.parse_adapter("x", cb, wb, cfg, torch.float16)
lo = old_pool.UnifiedPool(cfg, 2, 16, torch.float16, "cpu", torch.int8); ln = new_pool.UnifiedPool(cfg, 2, 16, torch.float16, "cpu", torch.int8)
t = {"old": [], "new": []}
for rep in range(15):
    for side, pl, lay in (("old", old_pool, lo), ("new", new_pool, ln)):
        t0 = time.perf_counter(); st = pl.stage_adapter(w, lay); t[side].append(time.perf_counter() - t0); del st
print({k: round(sorted(v)[7] * 1e3) for k, v in t.items()})
import cProfile, pstats
for side, pl, lay in (("old", old_pool, lo), ("new", new_pool, ln)):
    pr = cProfile.Profile(); pr.enable(); pl.stage_adapter(w, lay); pr.disable(); print(side); pstats.Stats(pr).sort_stats("tottime").print_stats(6)
