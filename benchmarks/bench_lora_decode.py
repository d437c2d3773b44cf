"""Decode LoRA as the engine's 256 x 256 step runs it, kernel variants side by side.

The engine's decode step applies, per layer, one q/k/v LoRA (shrink + expand over 3 modules) and
one o LoRA: 32 layers x 2 groups. This script builds that workload alone (a real pool and adapter
table, every adapter's rows in pages of its own, each token on a distinct adapter of ranks
8/16/32/64), captures the 32 layers (lora_shrink then lora_expand, as the model calls them) in a
CUDA graph per variant (a set of TUNE overrides) and times the replays. It runs in about a
minute where the engine sweep (engine_tune_sweep.py) takes one per variant, and it times the
kernels the engine profile names, so tiles are screened here and confirmed there.

Rounds alternate the variants (ABC ABC ...); each variant's median over rounds is reported with
q/k/v and o timed apart, against the bytes roofline (each token's adapter rows once, x read, y
read and written) at the copy bandwidth measured in the same run. Every variant's outputs are
checked against kernels.reference on fresh data before it is timed.

    python benchmarks/bench_lora_decode.py --variants benchmarks/tune/lora-decode-int8-tiles.json --out DIR
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported

import torch  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from kernels import reference as ref  # noqa: E402
from kernels import triton_lora as tlora  # noqa: E402
from kernels.batch import LoraBatch  # noqa: E402
from server.config import TARGET_MODULES, ModelConfig  # noqa: E402
from server.lora import LoraWeights  # noqa: E402
from server.pool import QUANTIZED, AdapterTable, UnifiedPool, stage_adapter  # noqa: E402

GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",))
DEFAULT_VARIANTS = {"committed": {}}
# what each variant's graphs launch: (name, groups, part); --split adds each kernel alone
PARTS = (("step", (0, 1), "both"), ("qkv", (0,), "both"), ("o", (1,), "both"),
         ("qkv_shrink", (0,), "shrink"), ("qkv_expand", (0,), "expand"), ("o_shrink", (1,), "shrink"),
         ("o_expand", (1,), "expand"))


def copy_bandwidth(dev) -> float:
    """Bytes/s of a 1 GiB device-to-device copy, read + written (bench_engine.py's measure)."""
    if dev.type != "cuda":
        return 1e10
    from benchmarks.bench_engine import copy_bandwidth as measure
    return measure(dev)


def build(cfg: ModelConfig, n_adapters: int, ranks: list[int], adapter_dtype, dtype, dev, seed: int = 0):
    """A pool and table holding n_adapters adapters (q/k/v/o, ranks cycling), one staged image
    per rank copied into fresh pages for each adapter."""
    g = torch.Generator().manual_seed(seed)
    probe = UnifiedPool(cfg, 1, 16, dtype, "cpu", adapter_dtype)
    staged = {}
    for r in sorted(set(ranks)):
        w = {}
        for layer in range(cfg.num_layers):
            for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
                d_in, d_out = cfg.module_dims(m)
                w[(layer, m)] = (torch.randn(r, d_in, generator=g) / d_in ** 0.5, torch.randn(d_out, r, generator=g) / r ** 0.5)
        staged[r] = stage_adapter(LoraWeights(f"r{r}", r, 2.0 * r, 2.0, ["q_proj", "k_proj", "v_proj", "o_proj"], False, w),
                                  probe, pin=dev.type == "cuda")
        print(f"staged rank {r}", flush=True)
    pages = sum(staged[ranks[i % len(ranks)]].num_pages for i in range(n_adapters))
    pool = UnifiedPool(cfg, pages + 8, 16, dtype, dev, adapter_dtype)
    table = AdapterTable(pool, n_adapters)
    slot_rank = []
    for i in range(n_adapters):
        r = ranks[i % len(ranks)]
        slot_rank.append((table.insert(staged[r]).slot, r))
    sync(dev)
    return pool, table, slot_rank


def row_bytes(cfg: ModelConfig, token_ranks: list[int], esize: float) -> float:
    """Adapter-row bytes one step must read: every token's A and B^T rows of q/k/v/o, all layers."""
    per_rank = sum(sum(cfg.module_dims(m)) for g in GROUPS for m in g)
    return cfg.num_layers * sum(token_ranks) * per_rank * esize


def act_bytes(cfg: ModelConfig, T: int, esize: int) -> int:
    """x read once per group, y read and written."""
    per_layer = sum(cfg.module_dims(g[0])[0] + 2 * sum(cfg.module_dims(m)[1] for m in g) for g in GROUPS)
    return cfg.num_layers * T * per_layer * esize


class Workload:
    def __init__(self, cfg, pool, table, batch, dtype, dev):
        self.cfg, self.pool, self.table, self.batch = cfg, pool, table, batch
        T = batch.token_slot.numel()
        self.groups = []
        for g in GROUPS:
            i0 = TARGET_MODULES.index(g[0])
            d_in = cfg.module_dims(g[0])[0]
            widths = tuple(cfg.module_dims(m)[1] for m in g)
            x = torch.randn(T, d_in, device=dev, dtype=dtype)
            y = torch.randn(T, sum(widths), device=dev, dtype=dtype)
            self.groups.append((i0, len(g), widths, x, y))
        # each group's v from layer 0, for timing the expand alone (its values do not matter)
        self.vs = [tlora.lora_shrink(x, table.flat, table.rows, self.meta(0, i0, n), batch, table.row_scale)
                   for i0, n, _, x, _ in self.groups]

    def step(self) -> None:
        """A new step: the compact shrink grid's plans are built again (the engine builds a batch, and
        with it the plans, every step; a graph captures their launches)."""
        self.batch.plans.clear()

    def meta(self, layer, i0, n):
        return self.table.meta[:, layer, i0:i0 + n] if n > 1 else self.table.meta[:, layer, i0]

    def apply(self, layer: int, gi: int, y=None, reference: bool = False, part: str = "both",
              fence: torch.Tensor | None = None) -> None:
        """Group gi's LoRA at one layer (lora_apply); part "shrink" or "expand" launches that split kernel alone.
        ``fence``: a one-element kernel first, as the engine's base GEMM precedes each group (a
        PDL launch then overlaps only the kernel before it, not the previous layer's expand)."""
        if fence is not None:
            fence.add_(1)
        i0, n, widths, x, y0 = self.groups[gi]
        y = y0 if y is None else y
        t, meta = self.table, self.meta(layer, i0, n)
        ops = ref if reference else tlora
        w = widths if n > 1 else None
        if part == "both":      # as the model calls it: shrink then expand, or one fused launch (TUNE FUSED)
            ops.lora_apply(y, x, t.flat, t.rows, meta, t.scaling, self.batch, w, t.row_scale)
            return
        v = self.vs[gi] if part == "expand" else ops.lora_shrink(x, t.flat, t.rows, meta, self.batch, t.row_scale)
        if part == "expand":
            ops.lora_expand(y, v, t.flat, t.rows, meta, t.scaling, self.batch, w, t.row_scale)

    def check(self) -> float:
        """Largest relative error over both groups of two layers against the reference."""
        # a new step: plans kept from the last graph capture hold what that graph's replays write,
        # not this batch's plan (an expand variant that read one failed the check, call 3 of
        # benchmarks/results/lora-segment-2026-12-04-h200)
        self.step()
        worst = 0.0
        for layer in (0, self.cfg.num_layers - 1):
            for gi in range(len(self.groups)):
                # a fresh, small y: the timing loops accumulate into the shared one, and fp16
                # rounding of a large y would swamp the delta
                y0 = torch.randn_like(self.groups[gi][4]) * 0.01
                got, want = y0.clone(), y0.clone()
                self.apply(layer, gi, got)
                self.apply(layer, gi, want, reference=True)
                d_got, d_want = (got.float() - y0.float()), (want.float() - y0.float())
                worst = max(worst, float((d_got - d_want).norm() / d_want.norm().clamp_min(1e-12)))
        return worst


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def graph(fn):
    """fn captured in a CUDA graph (on the CPU, fn itself)."""
    fn()
    if not torch.cuda.is_available():
        return fn
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def replay_ms(g, reps: int) -> float:
    if callable(g):      # --cpu-smoke: the interpreter, timed once
        t = time.perf_counter()
        g()
        return (time.perf_counter() - t) * 1e3
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--adapters", type=int, default=256, help="distinct adapters (token t uses adapter t mod N)")
    ap.add_argument("--ranks", default="8,16,32,64")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32, help="8 for a GQA shape (k and v 1024 wide)")
    ap.add_argument("--adapter-dtype", default="int8", choices=["int8", "int4", "auto"])
    ap.add_argument("--variants", help="JSON {name: {lora: {family: TUNE overrides}}}; the first is the reference row")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20, help="graph replays per timing")
    ap.add_argument("--tol", type=float, default=3e-3)
    ap.add_argument("--split", action="store_true", help="also time each group's shrink and expand alone")
    ap.add_argument("--fence", action="store_true",
                    help="a one-element kernel before each group's shrink (where the engine has its base GEMM)")
    ap.add_argument("--token-order", default="cycle", choices=["cycle", "rank-desc", "rank-asc"],
                    help="tokens in adapter order (ranks cycling) or sorted by rank: the programs of a launch "
                         "start in token order, so this is what a rank-sorted grid would buy")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    args = ap.parse_args()
    dev = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = torch.float16
    if args.cpu_smoke:
        cfg = ModelConfig(hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                          head_dim=16, vocab_size=100)
        args.tokens, args.adapters, args.layers, args.rounds, args.reps = 12, 6, 2, 1, 1
    else:
        cfg = ModelConfig(hidden_size=4096, intermediate_size=11008, num_layers=args.layers, num_heads=32,
                          num_kv_heads=args.kv_heads, head_dim=128, vocab_size=32000)
    adapter_dtype = QUANTIZED.get(args.adapter_dtype)
    ranks = [int(r) for r in args.ranks.split(",")]
    variants = json.loads(pathlib.Path(args.variants).read_text()) if args.variants else DEFAULT_VARIANTS
    t0 = time.time()
    bw = copy_bandwidth(dev)
    pool, table, slot_rank = build(cfg, args.adapters, ranks, adapter_dtype, dtype, dev)
    print(f"pool built in {time.time() - t0:.0f}s: {pool.stats()}; copy {bw / 1e9:.0f} GB/s", flush=True)
    tok = [slot_rank[t % len(slot_rank)] for t in range(args.tokens)]
    if args.token_order != "cycle":
        tok.sort(key=lambda sr: sr[1], reverse=args.token_order == "rank-desc")
    batch = LoraBatch.build([1] * args.tokens, [s for s, _ in tok], max(ranks), dev)
    work = Workload(cfg, pool, table, batch, dtype, dev)
    rbytes = row_bytes(cfg, [r for _, r in tok], pool.weight_bytes)
    abytes = act_bytes(cfg, args.tokens, 2)
    roof_ms = (rbytes + abytes) / bw * 1e3
    fence = torch.zeros(1, device=dev) if args.fence else None
    base_tune = copy.deepcopy(tlora.TUNE)
    graphs, results = {}, {}
    for name, v in variants.items():
        tlora.TUNE.clear()
        tlora.TUNE.update(copy.deepcopy(base_tune))
        try:
            for fam, over in v.get("lora", {}).items():
                tlora.TUNE[fam].update(over)
            err = work.check()
            parts = {}
            for key, gis, part in PARTS if args.split else PARTS[:3]:
                parts[key] = graph(lambda gis=gis, part=part: [work.step(), *(work.apply(layer, gi, part=part, fence=fence)
                                                               for layer in range(cfg.num_layers) for gi in gis)])
        except Exception as e:  # noqa: BLE001  (a variant that fails to compile or capture is reported, not fatal)
            print(f"{name}: failed: {repr(e)[:300]}", flush=True)
            results[name] = {"error": repr(e)[:300]}
            continue
        graphs[name] = parts
        results[name] = {"spec": v, "rel_err": err, "ok": err < args.tol, **{key: [] for key in parts}}
        print(f"{name}: rel err {err:.2e}", flush=True)
    tlora.TUNE.clear()
    tlora.TUNE.update(base_tune)
    for rnd in range(args.rounds):
        for name, parts in graphs.items():
            for key, g in parts.items():
                results[name][key].append(replay_ms(g, args.reps))
        print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(f"{n} {statistics.median(results[n]['step']):.3f}"
                                                           for n in graphs), flush=True)
    rows = []
    for name in graphs:
        r = results[name]
        for key in graphs[name]:
            r[key + "_ms"] = statistics.median(r[key])
        r["frac_roof"] = roof_ms / r["step_ms"]
        rows.append(name)
    ref_name = rows[0] if rows else None
    stamp = pathlib.Path(".commit")   # the device's copy of the tree has no .git: the caller writes this
    commit = stamp.read_text().strip() if stamp.exists() else subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "?"
    meta = {"date": datetime.date.today().isoformat(), "commit": commit,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke)",
            "torch": torch.__version__, "triton": __import__("triton").__version__, "tokens": args.tokens,
            "adapters": args.adapters, "ranks": ranks, "layers": args.layers, "kv_heads": args.kv_heads,
            "adapter_dtype": args.adapter_dtype, "fence": args.fence, "copy_GBps": bw / 1e9, "row_GB": rbytes / 1e9,
            "act_GB": abytes / 1e9, "roof_ms": roof_ms, "rounds": args.rounds, "reps": args.reps,
            "command": " ".join(sys.argv)}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lora_decode.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = [f"# decode LoRA, {args.tokens} tokens over {args.adapters} adapters (ranks {args.ranks}), {args.layers} layers",
             "", f"{meta['device']}, {meta['date']}, commit {commit}, torch {meta['torch']}, triton {meta['triton']}; "
             f"{args.adapter_dtype} rows; copy bandwidth {bw / 1e9:.0f} GB/s; rows {rbytes / 1e9:.2f} GB + activations "
             f"{abytes / 1e9:.2f} GB a step: roofline {roof_ms:.3f} ms. Medians of {args.rounds} alternating rounds of "
             f"{args.reps} graph replays" + (", a one-element kernel before each group" if args.fence else "") + ".",
             "", f"    {meta['command']}", "",
             "| variant | step ms | vs first | of roofline | q/k/v ms | o ms |"
             + (" q/k/v shrink | q/k/v expand | o shrink | o expand |" if args.split else "") + " rel err | spec |",
             "| --- | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: | ---: | ---: |" if args.split else "")
             + " ---: | --- |"]
    for name in rows:
        r = results[name]
        split = "".join(f" {r[k + '_ms']:.3f} |" for k, _, _ in PARTS[3:]) if args.split else ""
        lines.append(f"| {name} | {r['step_ms']:.3f} | {r['step_ms'] / results[ref_name]['step_ms']:.3f} | "
                     f"{r['frac_roof']:.0%} | {r['qkv_ms']:.3f} | {r['o_ms']:.3f} |{split} {r['rel_err']:.1e}"
                     f"{'' if r['ok'] else ' FAIL'} | `{json.dumps(r['spec'])}` |")
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed | | | | | | `{r['error'][:120]}` |")
    (out / "lora_decode.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
