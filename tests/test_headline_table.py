"""benchmarks/headline_table.py: the headline folder's table and target ratios from bench JSON."""
import json
import sys

import pytest

from benchmarks import headline_table as ht


def _run(backend, n, req_s, finished=10):
    return {"backend": backend, "n": n, "config": {"warm_s": 3.0},
            "result": {"num_finished": finished, "num_requests": 10, "throughput": req_s,
                       "output_token_throughput": req_s * 250, "avg_latency": 5.0,
                       "avg_first_token_latency": 0.5, "p90_first_token_latency": 0.9, "slo_attainment": 1.0}}


def test_table_and_ratios_from_a_results_folder(tmp_path, capsys, monkeypatch):
    n2000 = dict(_run("loraserve", 2000, 9.6), engine={"mean_batch": 80.0, "mean_distinct_adapters": 75.5,
                                                         "adapter_GB_per_step": 5.0, "adapter_bytes_vs_weights": 0.38,
                                                         "ms_per_step": 31.25, "device_share": 0.625})
    files = {"S2-n5.json": [_run("loraserve", 5, 10.0)], "S2-n2000.json": [n2000],
             "S2-n1000.json": [dict(_run("loraserve", 1000, 8.0), engine={
                 "mean_batch": 90.0, "mean_distinct_adapters": 70.0, "adapter_GB_per_step": 4.0,
                 "adapter_bytes_vs_weights": 0.3, "ms_per_step": 25.0, "device_share": 0.8, "gpu_share": 0.95})],
             "base.json": [_run("base", 0, 10.0)],
             "peft.json": [_run("loraserve", 100, 6.0), _run("peft", 100, 0.1, finished=2)],
             "notes.json": {"not": "runs"}, "prewarm-S2.json": [_run("loraserve", 5, 1.0)]}
    for name, runs in files.items():
        (tmp_path / name).write_text(json.dumps({"runs": runs} if isinstance(runs, list) else runs))
    data = ht.load(tmp_path)
    assert sorted(data) == ["S2", "base", "peft"]
    assert [r["n"] for r in data["S2"]] == [1000, 2000, 5]      # file order; the table sorts by n
    monkeypatch.setattr(sys, "argv", ["headline_table.py", str(tmp_path), "--no-plot"])
    ht.main()
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| S2") and "| loraserve |" in line]
    assert [r.split("|")[3].strip() for r in rows] == ["5", "1000", "2000"]
    assert rows[2].endswith("| 80.0 | 75.5 | 5.00 (38% of weights) | 31.2 (62% device) |")   # before gpu_share
    assert rows[1].endswith("| 90.0 | 70.0 | 4.00 (30% of weights) | 25.0 (GPU busy 95%) |")
    assert rows[0].endswith("| - | - | - | - |")
    assert "| S2 throughput at n = 2000 >= 95% of n = 5 | n=2000 / n=5: 9.60 / 10.00 req/s = 96.0% | yes |" in out
    assert "| S2 at n = 1000 >= 85% of base-only | n=1000 / base: 8.00 / 10.00 req/s = 80.0% | no |" in out
    assert "loraserve / PEFT: 6.00 / 0.10 req/s = 60.0x | yes |" in out


def test_repeated_runs_are_averaged(tmp_path):
    """REPEAT=2 writes S2-n5-r2.json and base-r2.json beside the first runs: ratios use the means."""
    files = {"S2-n5.json": [_run("loraserve", 5, 10.0)], "S2-n5-r2.json": [_run("loraserve", 5, 12.0)],
             "S2-n2000.json": [_run("loraserve", 2000, 10.0)], "S2-n2000-r2.json": [_run("loraserve", 2000, 10.0)],
             "S2-n1000.json": [_run("loraserve", 1000, 9.0)],
             "base.json": [_run("base", 0, 12.0)], "base-r2.json": [_run("base", 0, 8.0)]}
    for name, runs in files.items():
        (tmp_path / name).write_text(json.dumps({"runs": runs}))
    data = ht.load(tmp_path)
    assert sorted(data) == ["S2", "base"] and len(data["S2"]) == 5 and len(data["base"]) == 2
    out = ht.ratios(data)
    assert "| S2 throughput at n = 2000 >= 95% of n = 5 | n=2000 / n=5: 10.00 / 11.00 req/s = 90.9% (means of 2 and 2 runs) | no |" in out
    assert "| S2 at n = 1000 >= 85% of base-only | n=1000 / base: 9.00 / 10.00 req/s = 90.0% (means of 1 and 2 runs) | yes |" in out


def test_plot_starts_at_zero_and_draws_the_base_model(tmp_path):
    """A 1% dip between n = 5 and n = 2000 must look like one: both axes start at zero and
    the base-only run is a reference line."""
    pytest.importorskip("matplotlib")
    from clients.bench import plot_runs, runs_figure

    runs = [_run("loraserve", 5, 23.9), _run("loraserve", 2000, 23.7)]
    base = _run("base", 0, 27.4)
    fig = runs_figure(runs, base)
    tput, ttft = fig.axes
    assert tput.get_ylim()[0] == 0 and ttft.get_ylim()[0] == 0
    assert tput.get_ylim()[1] > 27.4                       # the base line is inside the plot
    assert [line.get_label() for line in tput.get_lines()] == ["loraserve", "base model only"]
    assert tput.get_xscale() == "log"
    out = tmp_path / "S2.png"
    assert plot_runs(runs, str(out), base) == str(out) and out.stat().st_size > 0
