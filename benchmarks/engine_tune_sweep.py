"""Engine decode step under several kernel tile variants, one device call: each variant runs
``benchmarks/bench_engine.py`` in its own process with ``LORASERVE_KERNEL_TUNE`` pointing at its
overrides, and the table compares their LoRA overheads (each against the base step of its own
run, so the ratios stand beside each other).

    python benchmarks/engine_tune_sweep.py --variants benchmarks/tune/decode-pipe.json --out DIR \\
        -- --shape llama7b --batches 1,256 --adapters 256 --no-eager --steps 10 --rounds 3 --context 256 \\
           --pool-gb 54 --adapter-dtype int8

The variants file maps a name to a TUNE override (``{"lora": {family: {...}}}``); ``{}`` is the
committed tiles. An override's ``"env"`` key sets environment variables for that run alone
(``{"env": {"LORASERVE_KERNELS": "reference"}}``).

The first run on a fresh machine has come out up to 4 points slow whatever its kernels
(benchmarks/results/lora-decode-pdl-2026-12-03-h200): ``--warmup`` runs the first variant once
more, first, and drops it; ``--repeat N`` runs the list N times in turn (ABAB), rows ``name@k``.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", required=True,
                    help='JSON: {name: TUNE override}; an override\'s "env" key holds environment variables for that run')
    ap.add_argument("--out", required=True)
    ap.add_argument("--timeout", type=float, default=300, help="seconds per variant")
    ap.add_argument("--repeat", type=int, default=1, help="run the variant list this many times, alternating")
    ap.add_argument("--warmup", action="store_true", help="run the first variant once first and drop it")
    ap.add_argument("bench_args", nargs=argparse.REMAINDER, help="-- then bench_engine.py's arguments")
    args = ap.parse_args()
    bench_args = [a for a in args.bench_args if a != "--"]
    variants = json.loads(pathlib.Path(args.variants).read_text())
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = []
    runs = [(f"{name}@{k + 1}" if k else name, override) for k in range(args.repeat) for name, override in variants.items()]
    if args.warmup and runs:
        runs.insert(0, ("_warmup", runs[0][1]))
    for i, (name, override) in enumerate(runs):
        vdir = out / name
        env = dict(os.environ)
        env.pop("LORASERVE_KERNEL_TUNE", None)
        override = dict(override)
        env.update({k: str(v) for k, v in override.pop("env", {}).items()})
        if override:
            tune = out / f"{name}.tune.json"
            tune.write_text(json.dumps(override))
            env["LORASERVE_KERNEL_TUNE"] = str(tune)
        print(f"[{i + 1}/{len(runs)}] {name}: {json.dumps(override)}", flush=True)
        cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_engine.py"), *bench_args, "--out", str(vdir)]
        try:
            run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"  {name}: timed out after {args.timeout:.0f} s", flush=True)
            continue
        (out / f"{name}.log").write_text(run.stdout + run.stderr)
        results = sorted(vdir.glob("engine-*.json"))
        if run.returncode != 0 or not results:
            print(f"  {name}: failed (exit {run.returncode}), see {name}.log", flush=True)
            continue
        if name == "_warmup":
            continue
        for row in json.loads(results[0].read_text())["rows"]:
            modes = [k[:-len("_overlapped_ms")] for k in row if k.endswith("_overlapped_ms") and k != "base_overlapped_ms"]
            for mode in modes:
                base, lora = row["base_overlapped_ms"], row[f"{mode}_overlapped_ms"]
                table.append((name, row["batch"], mode, base, lora, lora / base - 1))
                print(f"  batch {row['batch']} {mode}: {lora:.2f} ms vs base {base:.2f} ({lora / base - 1:+.1%})", flush=True)
    lines = ["| variant | batch | mode | base ms | LoRA ms | overhead |", "| --- | ---: | --- | ---: | ---: | ---: |"]
    lines += [f"| {n} | {b} | {m} | {base:.2f} | {lora:.2f} | {ov:+.1%} |" for n, b, m, base, lora, ov in table]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
