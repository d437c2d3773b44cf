"""S-LoRA workload generator against its definitions, trace replay, and the bench metrics."""
from __future__ import annotations

import json

import math

import numpy as np
import pytest

from clients.bench import RequestResult, compute_metrics, format_comparison, format_table
from clients.workload import (WorkloadSpec, adapter_probabilities, generate_workload, load_trace, save_trace,
                              synthetic_adapter_ids, with_adapters, workload_summary)


# Goodness-of-fit checks at significance 1e-3 with numpy only (scipy is not a dependency).
Z_999 = 3.0902      # standard normal 0.999 quantile
KS_C = math.sqrt(-0.5 * math.log(1e-3 / 2))   # Kolmogorov critical constant for alpha = 1e-3


def chi2_ok(observed, expected=None) -> bool:
    """Pearson's chi-square does not reject at 1e-3 (Wilson-Hilferty quantile of chi2(k-1))."""
    observed = np.asarray(observed, dtype=float)
    expected = np.full_like(observed, observed.mean()) if expected is None else np.asarray(expected, dtype=float)
    stat = float(np.sum((observed - expected) ** 2 / expected))
    k = len(observed) - 1
    crit = k * (1 - 2 / (9 * k) + Z_999 * math.sqrt(2 / (9 * k))) ** 3
    return stat < crit


def ks_ok(sample, cdf) -> bool:
    """One-sample Kolmogorov-Smirnov does not reject at 1e-3."""
    x = np.sort(np.asarray(sample))
    n = len(x)
    f = cdf(x)
    d = max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n))
    return d < KS_C / math.sqrt(n)


def ks2_ok(a, b) -> bool:
    """Two-sample Kolmogorov-Smirnov does not reject at 1e-3."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    d = np.max(np.abs(np.searchsorted(a, grid, side="right") / len(a) - np.searchsorted(b, grid, side="right") / len(b)))
    return d < KS_C * math.sqrt((len(a) + len(b)) / (len(a) * len(b)))


def test_goodness_of_fit_helpers_reject_wrong_distributions():
    rng = np.random.default_rng(0)
    assert chi2_ok(rng.multinomial(20000, [0.25] * 4))
    assert not chi2_ok(rng.multinomial(20000, [0.3, 0.2, 0.25, 0.25]))
    e = rng.exponential(0.5, 20000)
    assert ks_ok(e, lambda x: 1 - np.exp(-x / 0.5))
    assert not ks_ok(e, lambda x: 1 - np.exp(-x / 0.55))
    assert ks2_ok(e, rng.exponential(0.5, 20000))
    assert not ks2_ok(e, rng.gamma(2.0, 0.25, 20000))


def _gaps(reqs):
    t = np.array([r.timestamp for r in reqs])
    return np.diff(np.concatenate([[0.0], t]))


@pytest.mark.parametrize("rate,cv", [(2.0, 1.0), (10.0, 0.5), (5.0, 2.0), (20.0, 4.0)])
def test_arrivals_match_rate_and_cv(rate, cv):
    n_req = 40000
    reqs = generate_workload(WorkloadSpec(num_adapters=5, req_rate=rate, cv=cv, duration=n_req / rate, seed=7))
    assert len(reqs) == n_req == int(rate * (n_req / rate))
    gaps = _gaps(reqs)
    assert np.all(gaps >= 0)
    # empirical arrival rate within a few percent of R
    emp_rate = len(reqs) / reqs[-1].timestamp
    assert emp_rate == pytest.approx(rate, rel=0.03 * max(1.0, cv / 2))
    # empirical coefficient of variation of inter-arrival times
    emp_cv = gaps.std() / gaps.mean()
    assert emp_cv == pytest.approx(cv, rel=0.06 if cv <= 2 else 0.12)
    # and the inter-arrivals are Gamma(1/cv^2, cv^2/R): Kolmogorov-Smirnov does not reject
    # (for cv > 2 the shape is tiny and many gaps vanish below the timestamps' float resolution)
    if cv <= 2:
        reference = np.random.default_rng(12345).gamma(1 / cv ** 2, cv ** 2 / rate, 40000)
        assert ks2_ok(gaps, reference)


def test_cv_one_is_poisson():
    reqs = generate_workload(WorkloadSpec(num_adapters=1, req_rate=4.0, cv=1.0, duration=5000, seed=3))
    gaps = _gaps(reqs)
    assert ks_ok(gaps, lambda x: 1 - np.exp(-4.0 * x))
    # Poisson counts per 1 s window: variance == mean
    counts = np.bincount(np.array([r.timestamp for r in reqs]).astype(int))[:-1]
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.1)


def test_adapter_probabilities_definition():
    p = adapter_probabilities(10, 0.3)
    assert p.sum() == pytest.approx(1.0)
    assert np.all(np.diff(p) < 0)              # alpha < 1: earlier adapters are more popular
    i = np.arange(10)
    assert np.allclose(p, ((i + 1) / 10) ** 0.3 - (i / 10) ** 0.3)
    assert np.allclose(adapter_probabilities(7, 1.0), 1 / 7)   # alpha = 1: uniform
    assert np.all(np.diff(adapter_probabilities(10, 2.0)) > 0)


@pytest.mark.parametrize("alpha", [0.1, 0.3, 0.6, 1.0])
def test_adapter_popularity_follows_power_law(alpha):
    n, total = 50, 40000
    spec = WorkloadSpec(num_adapters=n, alpha=alpha, req_rate=total / 100, duration=100, seed=11)
    reqs = generate_workload(spec)
    ids = synthetic_adapter_ids(n)
    counts = np.bincount([r.adapter_index for r in reqs], minlength=n)
    assert all(r.adapter_id == ids[r.adapter_index] for r in reqs)
    p = adapter_probabilities(n, alpha)
    # frequencies match the power-law probabilities (chi-square goodness of fit)
    assert chi2_ok(counts, p * total)
    # the exponent fitted by maximum likelihood recovers alpha
    grid = np.linspace(0.02, 2.0, 991)
    ll = [np.sum(counts * np.log(np.maximum(adapter_probabilities(n, a), 1e-300))) for a in grid]
    assert grid[int(np.argmax(ll))] == pytest.approx(alpha, abs=0.03)
    # ratio of the most popular adapter's share to the least popular's
    if alpha < 1:
        assert counts[0] / max(counts[-1], 1) == pytest.approx(p[0] / p[-1], rel=0.25)


def test_lengths_uniform_in_range():
    spec = WorkloadSpec(num_adapters=3, req_rate=100, duration=200, input_range=(8, 64), output_range=(4, 20),
                        seed=5)
    reqs = generate_workload(spec)
    ins = np.array([r.input_len for r in reqs])
    outs = np.array([r.output_len for r in reqs])
    assert ins.min() == 8 and ins.max() == 63          # [lo, hi): hi excluded
    assert outs.min() == 4 and outs.max() == 19
    assert chi2_ok(np.bincount(ins - 8, minlength=56))
    assert chi2_ok(np.bincount(outs - 4, minlength=16))
    assert all(len(r.prompt_token_ids) == r.input_len for r in reqs)
    toks = np.concatenate([r.prompt_token_ids for r in reqs[:200]])
    assert toks.min() >= spec.token_low and toks.max() < spec.vocab_size


def test_fixed_seed_is_deterministic_and_seeds_differ():
    spec = WorkloadSpec(num_adapters=10, alpha=0.5, req_rate=5, duration=20, seed=42)
    a, b = generate_workload(spec), generate_workload(spec)
    assert [(r.timestamp, r.adapter_id, r.input_len, r.output_len, r.prompt_token_ids) for r in a] == \
           [(r.timestamp, r.adapter_id, r.input_len, r.output_len, r.prompt_token_ids) for r in b]
    spec.seed = 43
    c = generate_workload(spec)
    assert [r.timestamp for r in a] != [r.timestamp for r in c]


def test_request_count_cap_and_base_only():
    spec = WorkloadSpec(num_adapters=0, req_rate=10, duration=10, max_requests=17, seed=1)
    reqs = generate_workload(spec)
    assert len(reqs) == 17
    assert all(r.adapter_id == "" for r in reqs)
    retarget = with_adapters(generate_workload(WorkloadSpec(num_adapters=4, req_rate=5, duration=4)), [""])
    assert all(r.adapter_id == "" for r in retarget)
    # base-only (n = 0) and every n share arrivals, lengths and prompts: only the adapters differ
    same = [[(r.timestamp, r.input_len, r.output_len, r.prompt_token_ids) for r in
             generate_workload(WorkloadSpec(num_adapters=n, req_rate=10, duration=5, seed=7))] for n in (0, 5, 2000)]
    assert same[0] == same[1] == same[2]


def test_spec_validation():
    for bad in (dict(alpha=0), dict(req_rate=0), dict(cv=-1), dict(input_range=(5, 5)), dict(output_range=(0, 3))):
        with pytest.raises(ValueError):
            generate_workload(WorkloadSpec(**bad))
    with pytest.raises(ValueError):
        generate_workload(WorkloadSpec(num_adapters=5), ["a", "b"])


def test_trace_round_trip(tmp_path):
    reqs = generate_workload(WorkloadSpec(num_adapters=4, req_rate=5, duration=6, seed=2, input_range=(3, 9)))
    path = tmp_path / "trace.jsonl"
    save_trace(path, reqs, with_prompt=True)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert set(lines[0]) == {"timestamp", "adapter_id", "input_len", "output_len", "prompt_token_ids"}
    back = load_trace(path)
    assert [(r.adapter_id, r.input_len, r.output_len, r.prompt_token_ids) for r in back] == \
           [(r.adapter_id, r.input_len, r.output_len, r.prompt_token_ids) for r in reqs]
    assert [r.timestamp for r in back] == pytest.approx([r.timestamp for r in reqs], abs=1e-5)
    # without prompts: drawn deterministically with the requested lengths
    save_trace(path, reqs)
    a, b = load_trace(path, seed=1), load_trace(path, seed=1)
    assert [x.prompt_token_ids for x in a] == [x.prompt_token_ids for x in b]
    assert all(len(x.prompt_token_ids) == x.input_len for x in a)
    # unsorted lines are sorted by time; bad lines name the line
    (tmp_path / "u.jsonl").write_text('{"timestamp": 2, "adapter_id": "b", "input_len": 3, "output_len": 4}\n'
                                      '{"timestamp": 1, "adapter_id": "a", "input_len": 5, "output_len": 6}\n')
    u = load_trace(tmp_path / "u.jsonl")
    assert [r.adapter_id for r in u] == ["a", "b"]
    (tmp_path / "bad.jsonl").write_text('{"timestamp": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_trace(tmp_path / "bad.jsonl")


def test_workload_summary():
    reqs = generate_workload(WorkloadSpec(num_adapters=3, req_rate=8, duration=500, seed=9))
    s = workload_summary(reqs)
    assert s["num_requests"] == 4000
    assert s["rate"] == pytest.approx(8, rel=0.05)
    assert s["cv"] == pytest.approx(1, rel=0.06)
    assert s["num_adapters_used"] == 3


def _res(i, ttft, lat, toks, inp=10, err=""):
    r = RequestResult(i, "a", inp, toks, float(i))
    r.first_token_latency, r.latency, r.completion_tokens, r.error = ttft, lat, toks, err
    if err:
        r.latency = None
    return r


def test_metrics_definitions():
    rs = [_res(0, 0.5, 2.0, 10), _res(1, 1.0, 3.0, 5), _res(2, 7.0, 9.0, 3), _res(3, None, None, 0, err="NOT_FOUND")]
    m = compute_metrics(rs, total_time=10.0, slo=6.0)
    assert m["num_requests"] == 4 and m["num_finished"] == 3 and m["num_failed"] == 1
    assert m["errors"] == {"NOT_FOUND": 1}
    assert m["throughput"] == pytest.approx(0.3)
    assert m["output_token_throughput"] == pytest.approx(1.8)
    assert m["total_token_throughput"] == pytest.approx(4.8)
    assert m["avg_latency"] == pytest.approx(14 / 3)
    assert m["avg_first_token_latency"] == pytest.approx(8.5 / 3)
    assert m["p50_first_token_latency"] == pytest.approx(1.0)
    assert m["p90_first_token_latency"] == pytest.approx(np.percentile([0.5, 1.0, 7.0], 90))
    assert m["avg_per_output_token_latency"] == pytest.approx(np.mean([0.2, 0.6, 3.0]))
    assert m["avg_per_token_latency"] == pytest.approx(np.mean([2.0 / 20, 3.0 / 15, 9.0 / 13]))
    # S-LoRA's satisfaction: 1 - (ttft / 6)^2 under the SLO, 0 past it and for the failed request
    assert m["avg_satisfaction"] == pytest.approx((1 - (0.5 / 6) ** 2 + 1 - (1 / 6) ** 2 + 0 + 0) / 4)
    assert m["strip_throughput"] is None                       # no rate given
    long = compute_metrics(rs, total_time=30.0, slo=6.0, req_rate=0.05)
    assert long["strip_throughput"] == pytest.approx((3 - 2 * 0) / 10.0)
    assert compute_metrics(rs, total_time=30.0, slo=6.0, req_rate=0.1)["strip_throughput"] == pytest.approx((3 - 2) / 10.0)
    assert m["avg_tpot"] == pytest.approx(np.mean([1.5 / 9, 2.0 / 4, 2.0 / 2]))
    assert m["slo_attainment"] == pytest.approx(2 / 4)     # failed requests count as misses
    empty = compute_metrics([], 1.0)
    assert empty["throughput"] == 0 and empty["avg_latency"] is None
    runs = [{"backend": "loraserve", "n": 5, "result": m}, {"backend": "peft", "n": 5, "result": dict(m, throughput=0.1)}]
    table = format_table(runs)
    assert "loraserve" in table and "peft" in table and "req/s" in table
    cmp = format_comparison(runs)
    assert "loraserve/peft" in cmp
    assert [line for line in cmp.splitlines() if line.startswith("throughput")][0].split()[-1] == "3.00x"


@pytest.mark.parametrize("n, alpha, rate, cv, duration, cap", [(100, 1.0, 2.0, 1.0, 60.0, None),
                                                           (2000, 0.1, 10.0, 2.0, 30.0, None),
                                                           (5, 0.5, 60.0, 1.0, 8.0, 100), (0, 1.0, 4.0, 1.0, 5.0, None)])
def test_the_trace_is_s_loras_for_the_same_seed(n, alpha, rate, cv, duration, cap):
    """S-LoRA's generate_requests (benchmarks/trace.py) draws, after np.random.seed(seed): the
    adapters (power), input then output lengths (randint), then the intervals (gamma), each for
    int(rate * duration) requests; n = 0 is one base "adapter". The workload must be that trace."""
    spec = WorkloadSpec(num_adapters=n, alpha=alpha, req_rate=rate, cv=cv, duration=duration, seed=42,
                        input_range=(8, 512), output_range=(8, 512), max_requests=cap)
    reqs = generate_workload(spec)
    np.random.seed(42)                                   # S-LoRA's sequence, with the global API
    tot = int(rate * duration)
    ind = (np.random.power(alpha, tot) * max(n, 1)).astype(int)
    ins = np.random.randint(8, 512, tot)
    outs = np.random.randint(8, 512, tot)
    times = np.cumsum(np.random.gamma(1 / (cv * cv), cv * cv / rate, tot))
    k = tot if cap is None else min(cap, tot)
    assert len(reqs) == k
    assert [r.input_len for r in reqs] == ins[:k].tolist() and [r.output_len for r in reqs] == outs[:k].tolist()
    assert np.allclose([r.timestamp for r in reqs], times[:k])
    if n:
        assert [r.adapter_index for r in reqs] == ind[:k].tolist()
