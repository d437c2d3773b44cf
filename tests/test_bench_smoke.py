"""The engine benchmark and its tile-sweep driver run end to end on the CPU (tiny shape, the
pure-torch kernels), so the commands the device calls use do not rot between device sessions."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_engine_tune_sweep_runs_each_variant_with_its_overrides(tmp_path):
    variants = {"committed": {}, "pipe1": {"lora": {"shrink_decode": {"PIPE": 1}}}}
    vfile = tmp_path / "variants.json"
    vfile.write_text(json.dumps(variants))
    out = tmp_path / "sweep"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "engine_tune_sweep.py"), "--variants", str(vfile),
                          "--out", str(out), "--", "--shape", "tiny", "--batches", "2", "--adapters", "2",
                          "--steps", "2", "--rounds", "2", "--context", "16", "--pool-gb", "0.01"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in (out / "sweep.md").read_text().splitlines()[2:]]
    assert [r[0].strip() for r in rows] == ["committed", "pipe1"]
    for r in rows:
        base, lora = float(r[3]), float(r[4])
        assert base > 0 and lora > 0
    # the override reached the benchmark process as a file; the committed variant ran without one
    assert json.loads((out / "pipe1.tune.json").read_text()) == variants["pipe1"]
    assert not (out / "committed.tune.json").exists()
    meta = json.loads(next((out / "pipe1").glob("engine-*.json")).read_text())["meta"]
    assert meta["shape"] == "tiny" and meta["adapters"] == 2


def test_engine_tune_sweep_warms_up_and_alternates_repeats(tmp_path):
    """--warmup runs the first variant once first and leaves it out of the table; --repeat runs
    the list again in turn, as name@2."""
    vfile = tmp_path / "variants.json"
    vfile.write_text(json.dumps({"committed": {}}))
    out = tmp_path / "sweep"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "engine_tune_sweep.py"), "--variants", str(vfile),
                          "--out", str(out), "--warmup", "--repeat", "2", "--", "--shape", "tiny", "--batches", "2",
                          "--adapters", "2", "--steps", "2", "--rounds", "1", "--context", "16", "--pool-gb", "0.01"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line.split("|")[1].strip() for line in (out / "sweep.md").read_text().splitlines()[2:]]
    assert rows == ["committed", "committed@2"]
    assert next((out / "_warmup").glob("engine-*.json"))     # it ran, first
    assert run.stdout.index("_warmup") < run.stdout.index("] committed:")


def test_bench_lora_decode_checks_and_times_each_variant(tmp_path):
    """bench_lora_decode.py on tiny shapes (Triton interpreter): every variant is checked against
    the reference before it is timed, and a family that does not exist fails that variant alone."""
    variants = {"committed": {}, "expand-rc32": {"lora": {"expand_decode_int8": {"BLOCK_R": 32}}},
                "bogus": {"lora": {"no_such_family": {"BLOCK_R": 4}}}}
    vfile = tmp_path / "variants.json"
    vfile.write_text(json.dumps(variants))
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_lora_decode.py"), "--cpu-smoke",
                          "--split", "--variants", str(vfile), "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads((tmp_path / "lora_decode.json").read_text())
    r = res["results"]
    assert r["committed"]["ok"] and r["expand-rc32"]["ok"], r
    assert r["committed"]["rel_err"] < 3e-3 and r["committed"]["step_ms"] > 0
    assert all(r["committed"][k + "_ms"] > 0 for k in ("qkv_shrink", "qkv_expand", "o_shrink", "o_expand"))
    assert "no_such_family" in r["bogus"]["error"]
    assert res["meta"]["row_GB"] > 0 and res["meta"]["roof_ms"] > 0


def test_bench_lora_overlap_checks_each_side_stream_variant(tmp_path):
    """bench_lora_overlap.py on tiny shapes (Triton interpreter, one stream, no carve-out on the
    CPU): every side-stream variant's outputs match the serial order before it is timed."""
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_lora_overlap.py"), "--cpu-smoke",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads((tmp_path / "lora_overlap.json").read_text())["results"]
    assert set(res) == {"gemm", "serial", "gemm-lt", "serial-lt", "side-lt", "gemm-lt-c16", "side-lt-c16"}
    for name, r in res.items():
        assert r["median_ms"] > 0, name
        if r["mode"] == "side":
            assert r["rel_err"] < 1e-5, (name, r["rel_err"])    # fp32 on the CPU: the same sums
    assert (tmp_path / "lora_overlap.md").read_text().count("| side-lt") == 2


def test_bench_kernels_times_lora_kernels_on_int4_rows(tmp_path):
    """bench_kernels.py --adapter-dtype int4 (tiny shapes, Triton interpreter) times the decode and
    prefill LoRA kernels on int4 rows, says so in its results, and counts the rows' bytes at half a
    byte a weight in the roofline (fewer than the same cases with fp16 rows)."""
    rows = {}
    for dt in ("auto", "int4"):
        out = tmp_path / dt
        run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--cpu-smoke",
                              "--adapter-dtype", dt, "--only", "decode_lora,prefill_lora", "--adapters", "4",
                              "--out", str(out)], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "TRITON_INTERPRET": "1"})
        assert run.returncode == 0 and "FAILED" not in run.stdout, (run.stdout + run.stderr)[-2000:]
        res = json.loads((out / "kernels.json").read_text())
        assert res["meta"]["adapter_dtype"] == dt
        rows[dt] = [r for r in res["results"] if r["kind"] in ("decode_lora", "prefill_lora")]
        assert {r["kind"] for r in rows[dt]} == {"decode_lora", "prefill_lora"} and all(r["ms"] > 0 for r in rows[dt])
        assert f"adapter rows {dt}" in (out / "kernels.md").read_text()
    dec = [(a["bytes"], b["bytes"]) for a, b in zip(rows["auto"], rows["int4"]) if a["kind"] == "decode_lora"]
    assert dec and all(b4 < b16 for b16, b4 in dec)
