"""Decode-step cost of the engine on a GPU at real shapes, side by side in one run:

* base-only batch vs the same batch spread over N adapters of mixed ranks (the LoRA overhead);
* batch 1 vs the weight-bytes roofline (weights / measured device-to-device bandwidth).

Random fp16 weights built on the device from a config (no download). The step is the engine's own
(_run: batch metadata, forward, sampling), timed with CUDA events after warm-up.

    python benchmarks/bench_engine.py --shape llama7b --batches 1,32,256 --adapters 256 --out DIR
"""
from __future__ import annotations

import argparse
import json
import pathlib
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from server.config import ModelConfig  # noqa: E402
from server.lora import LoraWeights  # noqa: E402

SHAPES = {
    "llama7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, max_position_embeddings=2048),
}


def random_state(cfg: dict, dtype, device, seed=0) -> dict:
    g = torch.Generator(device).manual_seed(seed)
    dtype = dtype if device.type == "cuda" else torch.float32
    H, I, V, Lh = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    D = H // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * D, cfg["num_key_value_heads"] * D
    r = lambda *s: (torch.randn(*s, generator=g, device=device, dtype=dtype) * 0.02)  # noqa: E731
    sd = {"model.embed_tokens.weight": r(V, H), "model.norm.weight": 1 + r(H), "lm_head.weight": r(V, H)}
    for i in range(Lh):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        sd.update({a + "q_proj.weight": r(q, H), a + "k_proj.weight": r(kv, H), a + "v_proj.weight": r(kv, H),
                   a + "o_proj.weight": r(H, q), m + "gate_proj.weight": r(I, H), m + "up_proj.weight": r(I, H),
                   m + "down_proj.weight": r(H, I), f"model.layers.{i}.input_layernorm.weight": 1 + r(H),
                   f"model.layers.{i}.post_attention_layernorm.weight": 1 + r(H)})
    return sd


def random_adapter(cfg: ModelConfig, rank: int, targets: list[str], seed: int) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    w = {}
    for layer in range(cfg.num_layers):
        for m in targets:
            d_in, d_out = cfg.module_dims(m)
            w[(layer, m)] = (torch.randn(rank, d_in, generator=g) * 0.01, torch.randn(d_out, rank, generator=g) * 0.01)
    return LoraWeights(f"a{seed}", rank, 2.0 * rank, 2.0, targets, False, w)


def copy_bandwidth(device) -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(20):
        y.copy_(x)
    e.record()
    torch.cuda.synchronize()
    return 2 * x.numel() * 20 / (s.elapsed_time(e) / 1e3)    # bytes read + written per second


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama7b", choices=sorted(SHAPES))
    ap.add_argument("--batches", default="1,32,128,256")
    ap.add_argument("--adapters", type=int, default=256)
    ap.add_argument("--spread", default="",
                    help="comma list: also time each batch spread over only K of the adapters (e.g. 16,1); "
                         "the batch then has runs of requests sharing an adapter")
    ap.add_argument("--distinct", type=int, default=8, help="distinct weight sets (copies fill the other slots)")
    ap.add_argument("--ranks", default="8,16,32,64")
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=1,
                    help="timed rounds of the overlapped steps, from the same contexts; the median is reported")
    ap.add_argument("--pool-gb", type=float, default=30)
    ap.add_argument("--prefill", default="", metavar="PxL",
                    help="also time mixed steps: P prompts of L tokens (same adapter spread) beside the decode batch; "
                         "these run eagerly, as every step with a prefill does")
    ap.add_argument("--no-graphs", dest="graphs", action="store_false", help="eager steps only")
    ap.add_argument("--no-eager", dest="eager", action="store_false", help="CUDA-graph steps only")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="also profile STEPS steps of each batch and mode (torch.profiler): kernel tables under --out")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--adapter-dtype", default="auto", choices=["auto", "int8", "int4"],
                    help="adapter rows in the pool: the model's dtype, or int8 / int4 with a scale per row")
    ap.add_argument("--out")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")   # CPU: a smoke run only
    from kernels.batch import AttnBatch  # noqa: F401
    from server.adapters import AdapterManager, LocalSource
    from server.engine import Engine
    from server.model import LlamaModel
    from server.pool import QUANTIZED, AdapterTable, UnifiedPool, stage_adapter
    from server.request import Request
    from server.runtime import block_tokens_for
    from server.sampler import SamplingParams
    from server.scheduler import SchedulerConfig, Step

    raw = {"architectures": ["LlamaForCausalLM"], "rms_norm_eps": 1e-5, **SHAPES[args.shape]}
    cfg = ModelConfig.from_dict(raw, name=args.shape)
    dtype = getattr(torch, args.dtype) if dev.type == "cuda" else torch.float32
    model = LlamaModel(cfg, random_state(raw, dtype, dev), dtype, dev)
    bw = copy_bandwidth(dev) if dev.type == "cuda" else 20e9
    B = block_tokens_for(cfg, 16)
    page_bytes = B * cfg.kv_width * 2
    pool = UnifiedPool(cfg, int(args.pool_gb * (1 << 30)) // page_bytes, B, dtype, dev,
                       QUANTIZED.get(args.adapter_dtype))
    pool.data.normal_(0, 0.02)     # never time on zeros
    table = AdapterTable(pool, max(args.adapters, 1))
    mgr = AdapterManager(pool, table, LocalSource(), cfg)
    engine = Engine(model, pool, table, mgr, SchedulerConfig(max_num_seqs=1024, max_model_len=4096))
    ranks = [int(r) for r in args.ranks.split(",")]
    targets = args.targets.split(",")
    t0 = time.time()
    staged = [stage_adapter(random_adapter(cfg, ranks[i % len(ranks)], targets, i), pool, pin=dev.type == "cuda")
              for i in range(min(args.distinct, args.adapters))]
    for i in range(args.adapters):
        mgr.put_host(f"a{i}", 0, staged[i % len(staged)])
        mgr.release(f"a{i}", mgr.acquire(f"a{i}"))
    sync()
    print(f"loaded {args.adapters} adapters in {time.time() - t0:.1f}s; pool {pool.stats()}", flush=True)

    def make_batch(n: int, spread: int, context: int | None = None, tag: str = "d") -> list[Request]:
        """n requests; spread 0: base model; else over `spread` adapters, interleaved."""
        reqs = []
        rng = random.Random(n)
        for i in range(n):
            aid = f"a{i % spread}" if spread else ""
            r = Request(f"{tag}{n}-{i}", [rng.randrange(cfg.vocab_size) for _ in range(context or args.context)],
                        SamplingParams(max_new_tokens=10_000, ignore_eos=True), aid)
            r.output_ids = [1]
            if aid:
                r.slot = mgr.acquire(aid)
            engine.scheduler._grow(r, r.total_len + 3 * args.steps + 16)   # time_steps, time_overlapped, time_mixed
            r.num_computed = r.total_len - 1      # KV "already computed": pages hold random data
            reqs.append(r)
        return reqs

    def time_steps(reqs) -> tuple[float, float]:
        """Wall time per step (the engine syncs each step: sampling reads tokens back)."""
        for _ in range(3):
            engine._run(Step([], reqs))
        sync()
        st = engine.stats
        before = (st.prep_s, st.device_s, st.post_s, st.gpu_s)
        w0 = time.perf_counter()
        for _ in range(args.steps):
            engine._run(Step([], reqs))
        sync()
        # host timers (prep, launch + wait, post) and the step's device time between CUDA events
        split = [round((a - b) * 1e3 / args.steps, 2)
                 for a, b in zip((st.prep_s, st.device_s, st.post_s, st.gpu_s), before)]
        return split, (time.perf_counter() - w0) * 1e3 / args.steps

    def time_overlapped(reqs) -> float:
        """(wall ms, device ms between CUDA events) per decode step as the serving loop runs them:
        step N+1 is launched before step N's tokens are read, so the host's work per step overlaps
        the device's. With
        --rounds R, the median of R rounds, each from the same contexts (so a stray slow round
        does not move a ratio, and later rounds do not read longer contexts)."""
        run = lambda: engine._overlap(Step([], list(reqs)))  # noqa: E731
        for _ in range(3):
            run()
        engine._overlap(Step([], []))    # reads the last one
        sync()
        start = [(r, len(r.output_ids), r.num_computed) for r in reqs]
        rounds = []
        gpu0, steps0 = engine.stats.gpu_s, engine.stats.steps
        for _ in range(args.rounds):
            for r, n_out, done in start:     # back to the same contexts
                del r.output_ids[n_out:]
                r.num_computed = done
            w0 = time.perf_counter()
            for _ in range(args.steps):
                run()
            engine._overlap(Step([], []))
            sync()
            rounds.append((time.perf_counter() - w0) * 1e3 / args.steps)
        gpu_ms = (engine.stats.gpu_s - gpu0) * 1e3 / max(1, engine.stats.steps - steps0)
        return statistics.median(rounds), gpu_ms

    def mixed_step(prefills, decodes):
        """A step that prefills every prompt again beside the decode batch."""
        def step():
            for r in prefills:
                r.output_ids, r.num_computed = [], 0
            engine._run(Step(list(prefills), decodes))
        return step

    def time_mixed(step) -> float:
        """Wall ms of a mixed step."""
        for _ in range(2):
            step()
        sync()
        w0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        return (time.perf_counter() - w0) * 1e3 / args.steps

    def profile(step, name: str) -> None:
        """Kernel time table of a few steps (CUPTI records the kernels inside graph replays too)."""
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof
        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for _ in range(args.profile):
                step()
            sync()
        table = p.key_averages().table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90)
        pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
        (pathlib.Path(args.out) / f"profile-{name}.txt").write_text(f"{args.profile} steps\n{table}\n")

    n_pre, l_pre = (int(v) for v in args.prefill.split("x")) if args.prefill else (0, 0)
    rows = []
    # bytes a decode step must read: every weight once (the embedding only its T rows) + the KV
    weight_bytes = model.weight_bytes - model.embed.numel() * model.embed.element_size()
    batches = [int(b) for b in args.batches.split(",")]
    spreads = [args.adapters] + [int(k) for k in args.spread.split(",") if k] if args.adapters else []
    modes = [("base", 0)] + [("lora" if k == args.adapters else f"lora{k}", min(k, args.adapters)) for k in spreads]
    graph_modes = [g for g, on in ((False, args.eager), (True, dev.type == "cuda" and args.graphs)) if on]
    for graphs in graph_modes or [False]:
        if graphs:
            t0 = time.time()
            engine.capture_graphs(max(batches), max(ranks), batches)
            print(f"captured graphs in {time.time() - t0:.1f}s", flush=True)
        tag = "graph" if graphs else "eager"
        for n in batches:
            out = {"batch": n, "mode": tag}
            for mode, spread in modes:
                reqs = make_batch(n, spread)
                split, wall_ms = time_steps(reqs)
                if args.profile and args.out:
                    profile(lambda: engine._run(Step([], reqs)), f"{args.shape}-{tag}-b{n}-{mode}")
                out[f"{mode}_prep_device_post_ms"], out[f"{mode}_gpu_ms"] = split[:3], split[3]
                wall, gpu = time_overlapped(reqs)
                out[f"{mode}_overlapped_ms"], out[f"{mode}_overlapped_gpu_ms"] = round(wall, 3), round(gpu, 3)
                kv_bytes = sum(2 * cfg.num_layers * r.total_len * cfg.kv_width * 2 for r in reqs)
                out[f"{mode}_ms"] = round(wall_ms, 3)
                out["roofline_ms"] = round((weight_bytes + kv_bytes) / bw * 1e3, 3)
                if n_pre:
                    pre = make_batch(n_pre, spread, context=l_pre, tag="p")
                    step = mixed_step(pre, reqs)
                    out[f"prefill_{mode}_ms"] = round(time_mixed(step), 3)
                    if args.profile and args.out:
                        profile(step, f"{args.shape}-{tag}-b{n}-{mode}-prefill{args.prefill}")
                    for r in pre:
                        engine.scheduler.free(r)
                for r in reqs:
                    engine.scheduler.free(r)
            for mode, _ in modes[1:]:
                out[f"{mode}_overhead"] = round(out[f"{mode}_ms"] / out["base_ms"] - 1, 3)
                if n_pre:
                    out[f"prefill_{mode}_overhead"] = round(out[f"prefill_{mode}_ms"] / out["prefill_base_ms"] - 1, 3)
            out["base_vs_roofline"] = round(out["base_ms"] / out["roofline_ms"], 2)
            rows.append(out)
            print(json.dumps(out), flush=True)
    meta = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__, "shape": args.shape,
            "dtype": str(dtype).removeprefix("torch."), "adapter_dtype": args.adapter_dtype, "copy_bw_GBps": round(bw / 1e9, 1), "weight_GB": round(weight_bytes / 1e9, 2),
            "adapters": args.adapters, "spread": spreads, "prefill": args.prefill, "ranks": ranks, "targets": targets, "context": args.context,
            "date": time.strftime("%Y-%m-%d"), "argv": sys.argv}
    print(json.dumps(meta))
    lm = [m for m, _ in modes[1:]]
    print(f"\n{'mode':>6} {'batch':>6} {'base ms':>9} " + " ".join(f"{m + ' ms':>10} {'overhead':>9}" for m in lm)
          + f" {'roofline ms':>12} {'base/roof':>10}")
    for r in rows:
        print(f"{r['mode']:>6} {r['batch']:>6} {r['base_ms']:>9} "
              + " ".join(f"{r.get(m + '_ms', '-'):>10} {r.get(m + '_overhead', '-'):>9}" for m in lm)
              + f" {r['roofline_ms']:>12} {r['base_vs_roofline']:>10}")
    print("\nms per step as the serving loop runs them (step N+1 launched before N's tokens are read) "
          "vs one step at a time:")
    for r in rows:
        print(f"{r['mode']:>6} {r['batch']:>6} " + " ".join(
            f"{m}: {r[m + '_overlapped_ms']} vs {r[m + '_ms']}" for m in ["base"] + lm))
    print("\ndevice ms per step between CUDA events, overlapped vs one step at a time:")
    for r in rows:
        print(f"{r['mode']:>6} {r['batch']:>6} " + " ".join(
            f"{m}: {r[m + '_overlapped_gpu_ms']} vs {r[m + '_gpu_ms']}" for m in ["base"] + lm))
    if args.out:
        pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
        suffix = ('' if args.dtype == 'float16' else '-' + args.dtype) + ('' if args.adapter_dtype == 'auto' else '-' + args.adapter_dtype)
        (pathlib.Path(args.out) / f"engine-{args.shape}{suffix}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
