"""The PEFT baseline (transformers + peft, one request at a time) on a tiny model, on CPU."""
from __future__ import annotations

import json

import pytest

from clients.bench import compute_metrics
from clients.peft_baseline import AdapterSource, load_model, materialize_synthetic, run_peft_baseline
from clients.workload import WorkloadSpec, generate_workload, synthetic_adapter_ids
from tests.helpers import TINY, make_model

pytest.importorskip("peft")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    model_dir = make_model(root / "model")
    ids = synthetic_adapter_ids(3)
    sources = {}
    for i, aid in enumerate(ids):
        d = materialize_synthetic(root / aid, model_dir, rank=(4, 8, 16)[i], target_modules=["q_proj", "v_proj"], seed=i)
        sources[aid] = AdapterSource(aid, str(d))
    return model_dir, sources


def test_materialized_synthetic_adapter_is_valid_peft(tiny):
    from server.config import ModelConfig
    from server.lora import load_peft_dir

    model_dir, sources = tiny
    cfg = ModelConfig.from_dir(model_dir)
    w = load_peft_dir("x", sources["bench-00001"].path, cfg)
    assert w.rank == 8 and w.target_modules == ["q_proj", "v_proj"] and w.alpha == 16.0
    assert len(w.weights) == TINY["num_hidden_layers"] * 2
    conf = json.loads((tmp := (sources["bench-00000"].path + "/adapter_config.json")) and open(tmp).read())
    assert conf["r"] == 4
    # deterministic: same spec, same bytes
    again = materialize_synthetic(model_dir.parent / "again", model_dir, rank=4, target_modules=["q_proj", "v_proj"], seed=0)
    assert (again / "adapter_model.safetensors").read_bytes() == \
           open(sources["bench-00000"].path + "/adapter_model.safetensors", "rb").read()


def test_peft_baseline_serves_workload_serially(tiny):
    model_dir, sources = tiny
    spec = WorkloadSpec(num_adapters=3, alpha=0.5, req_rate=50, duration=0.2, input_range=(4, 12),
                        output_range=(2, 6), vocab_size=TINY["vocab_size"], seed=4)
    reqs = generate_workload(spec)
    reqs += [r for r in generate_workload(WorkloadSpec(num_adapters=0, req_rate=50, duration=0.1, input_range=(4, 8),
                                                       output_range=(2, 4), vocab_size=97, seed=5))]
    for i, r in enumerate(reqs):
        r.index = i
    model, device = load_model(str(model_dir), sources, device="cpu", dtype="float32")
    results, total = run_peft_baseline(reqs, str(model_dir), sources, model=model)
    assert len(results) == len(reqs) and total > 0
    by_idx = {r.index: r for r in reqs}
    for res in results:
        assert res.ok, res.error
        assert res.completion_tokens == by_idx[res.index].output_len
        assert 0 < res.first_token_latency <= res.latency
    # one at a time: each request finishes after the previous one's arrival + its own latency
    ends = sorted(res.scheduled + res.latency for res in results)
    assert all(b >= a for a, b in zip(ends, ends[1:]))
    m = compute_metrics(results, total)
    assert m["num_finished"] == len(reqs) and m["throughput"] > 0


def test_peft_baseline_adapters_change_outputs(tiny):
    """The active adapter really switches per request (outputs differ from the base model's)."""
    import torch

    model_dir, sources = tiny
    model, _ = load_model(str(model_dir), sources, device="cpu", dtype="float32")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        model.set_adapter("a_bench_00002")
        a = model(input_ids=ids).logits
        with model.disable_adapter():
            b = model(input_ids=ids).logits
    assert not torch.allclose(a, b)


def test_peft_baseline_rejects_unknown_adapter(tiny):
    model_dir, sources = tiny
    reqs = generate_workload(WorkloadSpec(num_adapters=1, req_rate=10, duration=0.5, vocab_size=97), ["nope"])
    with pytest.raises(ValueError, match="nope"):
        run_peft_baseline(reqs, str(model_dir), sources)
