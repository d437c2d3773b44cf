"""Old (05f45b1, checked out at /tmp/old) vs new stage_adapter and parse_adapter, alternating in
one process; outputs compared. --same-input: stage one parsed adapter with both, 15 times each."""
import importlib.util, pathlib, sys, time, torch
torch.set_num_threads(1)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3]))
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
if "--same-input" in sys.argv:
    cb, wb = synthetic_adapter(SyntheticParams(64, ("q_proj","k_proj","v_proj","o_proj"), 1, 1.0), dims, cfg.name)
    w = new_lora.parse_adapter("x", cb, wb, cfg, torch.float16)
    lay = {s: p.UnifiedPool(cfg, 2, 16, torch.float16, "cpu", torch.int8) for s, p in (("old", old_pool), ("new", new_pool))}
    t = {"old": [], "new": []}
    for rep in range(15):
        for side, pl in (("old", old_pool), ("new", new_pool)):
            t0 = time.perf_counter(); st = pl.stage_adapter(w, lay[side]); t[side].append(time.perf_counter() - t0); del st
    print("rank 64 q/k/v/o, one parsed input, stage medians (ms):", {k: round(sorted(v)[7] * 1e3) for k, v in t.items()})
    sys.exit()
for targets in (("q_proj","k_proj","v_proj","o_proj"), ("q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj")):
  for rank in (64, 8):
    cb, wb = synthetic_adapter(SyntheticParams(rank, targets, 1, 1.0), dims, cfg.name)
    res = {}
    for side, pl, lo in (("old", old_pool, old_lora), ("new", new_pool, new_lora)):
        layout = pl.UnifiedPool(cfg, 2, 16, torch.float16, "cpu", torch.int8)
        res[side] = (pl, lo, layout, [], [])
    for rep in range(7):
        for side in (("old", "new") if rep % 2 else ("new", "old")):
            pl, lo, layout, tp, ts = res[side][:5]
            t0 = time.perf_counter(); w = lo.parse_adapter("x", cb, wb, cfg, torch.float16); t1 = time.perf_counter()
            st = pl.stage_adapter(w, layout); t2 = time.perf_counter()
            tp.append(t1 - t0); ts.append(t2 - t1)
            res[side] = (pl, lo, layout, tp, ts) + ((st,) if rep == 0 else res[side][5:])
    a, b = res["old"][5], res["new"][5]
    same = all(torch.equal(x, y) for x, y in ((a.rel_offsets, b.rel_offsets), (a.meta, b.meta), (a.row_scale, b.row_scale)))
    fa, fb = a.images.view(-1), b.images.view(-1)
    for l in range(cfg.num_layers):
        for mi, mod in enumerate(new_pool.TARGET_MODULES):
            s0, s1, ra, rb = a.meta[l, mi].tolist()
            if ra == 0: continue
            d_in, d_out = cfg.module_dims(mod)
            for start, n, wdt in ((s0, ra, d_in), (s1, rb, d_out)):
                for j in range(start, start + n):
                    o = int(a.rel_offsets[j]); same = same and torch.equal(fa[o:o + wdt], fb[o:o + wdt])
    med = lambda v: sorted(v)[len(v) // 2] * 1e3
    print(f"{len(targets)} targets rank {rank} int8 ({len(wb)/1e6:.0f} MB fp16): parse old {med(res['old'][3]):.0f} / new {med(res['new'][3]):.0f} ms; "
          f"stage old {med(res['old'][4]):.0f} / new {med(res['new'][4]):.0f} ms (medians of 7, alternating); identical staged images: {same}")
