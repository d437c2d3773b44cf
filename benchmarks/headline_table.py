"""The headline experiment's table, ratios and plots from the JSON files `slora_headline.sh` writes.

Each `<setting>-n<N>.json` (and `base.json`, `peft.json`) holds `loraserve bench` runs. This
prints a markdown table (one row per run), the issue's target ratios computed from the same
files, and writes one plot per setting next to them.

    python benchmarks/headline_table.py benchmarks/results/headline-2026-11-25b-h100
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from clients.bench import plot_runs  # noqa: E402

LABELS = {"S1": "S1 (rank 8)", "S2": "S2 (ranks 64/32/16/8)", "GQA": "GQA Llama-3-8B (ranks 64-8, attn+MLP)",
          "base": "base model only", "peft": "PEFT"}


def load(folder: pathlib.Path) -> dict[str, list[dict]]:
    """{setting: [run, ...]} from every results JSON in the folder."""
    out: dict[str, list[dict]] = {}
    for f in sorted(folder.glob("*.json")):
        if f.stem.startswith("prewarm"):     # discarded warm-up runs (compiles), not results
            continue
        setting = re.sub(r"-r\d+$", "", f.stem).split("-n")[0]    # S2-n5-r2.json: S2's second n=5 run
        try:
            runs = json.loads(f.read_text())["runs"]
        except (ValueError, KeyError):
            continue
        out.setdefault(setting, []).extend(runs)
    return out


def _f(v, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


def _engine(run: dict) -> str:
    """The engine's decode steps during the run (bench records them from GetStats)."""
    e = run.get("engine")
    if not e:
        return "- | - | - | -"
    share = e.get("adapter_bytes_vs_weights")
    step = "-" if e.get("ms_per_step") is None else (
        f"{e['ms_per_step']:.1f} (GPU busy {100 * e['gpu_share']:.0f}%)" if e.get("gpu_share") is not None
        else f"{e['ms_per_step']:.1f} ({100 * e['device_share']:.0f}% device)")   # runs from before gpu_share
    return (f"{e['mean_batch']:.1f} | {e['mean_distinct_adapters']:.1f} | {e['adapter_GB_per_step']:.2f}"
            + (f" ({100 * share:.0f}% of weights)" if share else "") + f" | {step}")


def table(data: dict[str, list[dict]]) -> str:
    rows = ["| setting | backend | n | finished | req/s | output tok/s | avg latency s | avg TTFT s | p90 TTFT s "
            "| SLO (TTFT < 6 s) | warm-up s | decode batch | adapters / step | adapter GB / step | ms / step |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for setting, runs in data.items():
        for r in sorted(runs, key=lambda r: (r["backend"] != "loraserve", r["n"])):
            m = r["result"]
            n = "-" if r["backend"] == "base" and setting == "base" else str(r["n"])
            rows.append(f"| {LABELS.get(setting, setting)} | {r['backend']} | {n} "
                        f"| {m['num_finished']}/{m['num_requests']} | {m['throughput']:.2f} "
                        f"| {m['output_token_throughput']:.0f} | {_f(m['avg_latency'], '{:.1f}')} "
                        f"| {_f(m['avg_first_token_latency'], '{:.2f}')} | {_f(m['p90_first_token_latency'], '{:.2f}')} "
                        f"| {_f(m['slo_attainment'], '{:.2f}')} | {_f(r['config'].get('warm_s'), '{:.0f}')} "
                        f"| {_engine(r)} |")
    return "\n".join(rows)


def _tput(runs: list[dict], backend: str, n: int | None = None) -> tuple[float, int] | None:
    """Mean requests/s over the matching runs (repeats of one command: REPEAT=k), and their count."""
    got = [r["result"]["throughput"] for r in runs if r["backend"] == backend and (n is None or r["n"] == n)]
    return (sum(got) / len(got), len(got)) if got else None


def ratios(data: dict[str, list[dict]]) -> str:
    lines = ["| target | measured | met |", "| --- | --- | --- |"]

    def add(target: str, a: tuple | None, b: tuple | None, goal: float, what: str) -> None:
        if a is None or b is None:
            lines.append(f"| {target} | not measured | - |")
            return
        r = a[0] / b[0]
        # rounded down, so a ratio a hair under its goal never reads as the goal (94.95% -> 94.9%)
        shown = f"{math.floor(r * 1000 + 1e-9) / 10:.1f}%" if goal <= 1 else f"{r:.1f}x"
        reps = f" (means of {a[1]} and {b[1]} runs)" if max(a[1], b[1]) > 1 else ""
        lines.append(f"| {target} | {what}: {a[0]:.2f} / {b[0]:.2f} req/s = {shown}{reps} | "
                     f"{'yes' if r >= goal else 'no'} |")

    base = _tput(data.get("base", []), "base")
    for s in ("S1", "S2", "GQA"):
        runs = data.get(s, [])
        if runs:
            add(f"{s} throughput at n = 2000 >= 95% of n = 5", _tput(runs, "loraserve", 2000),
                _tput(runs, "loraserve", 5), 0.95, "n=2000 / n=5")
    for s in ("S2", "S1"):
        if s in data:
            add(f"{s} at n = 1000 >= 85% of base-only", _tput(data[s], "loraserve", 1000), base, 0.85, "n=1000 / base")
            break
    peft = data.get("peft", [])
    add(">= 40x the PEFT baseline at n = 100 (same workload, same call)", _tput(peft, "loraserve", 100),
        _tput(peft, "peft", 100), 40, "loraserve / PEFT")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=pathlib.Path)
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args()
    data = load(args.folder)
    if not data:
        sys.exit(f"no results JSON in {args.folder}")
    print(table(data))
    print()
    print(ratios(data))
    if not args.no_plot:
        base = next((r for r in data.get("base", []) if r["backend"] == "base"), None)
        for s in ("S1", "S2", "GQA"):
            runs = [r for r in data.get(s, []) if r["backend"] == "loraserve"]
            if len({r["n"] for r in runs}) > 1:
                plot_runs(runs, str(args.folder / f"{s}.png"), base)


if __name__ == "__main__":
    main()
