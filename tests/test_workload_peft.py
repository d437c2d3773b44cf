"""The PEFT baseline (transformers + peft on S-LoRA's schedule: arrived requests grouped by
adapter, in padded batches) on a tiny model, on CPU."""
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


def _mixed_workload():
    reqs = generate_workload(WorkloadSpec(num_adapters=3, alpha=0.5, req_rate=50, duration=0.2, input_range=(4, 12),
                                          output_range=(2, 6), vocab_size=TINY["vocab_size"], seed=4))
    reqs += [r for r in generate_workload(WorkloadSpec(num_adapters=0, req_rate=50, duration=0.1, input_range=(4, 8),
                                                       output_range=(2, 4), vocab_size=97, seed=5))]
    for i, r in enumerate(reqs):
        r.index = i
    return reqs


@pytest.mark.parametrize("batch", [1, 6])
def test_peft_baseline_serves_the_workload(tiny, batch):
    model_dir, sources = tiny
    reqs = _mixed_workload()
    model, device = load_model(str(model_dir), sources, device="cpu", dtype="float32")
    results, total = run_peft_baseline(reqs, str(model_dir), sources, model=model, max_batch_size=batch)
    assert len(results) == len(reqs) and total > 0
    by_idx = {r.index: r for r in reqs}
    for res in results:
        assert res.ok, res.error
        assert res.completion_tokens == by_idx[res.index].output_len
        assert 0 < res.first_token_latency <= res.latency
    if batch == 1:   # one at a time: no two requests are served at once
        spans = sorted((res.scheduled + res.first_token_latency, res.scheduled + res.latency) for res in results)
        assert all(b[0] >= a[1] - 1e-4 for a, b in zip(spans, spans[1:]))
    m = compute_metrics(results, total)
    assert m["num_finished"] == len(reqs) and m["throughput"] > 0


def test_peft_baseline_batches_what_arrived_by_adapter(tiny):
    """Eight requests that arrive together: one adapter's five in one batch (their first tokens
    come together), another's three in the next; each leaves the batch at its own length."""
    from clients.workload import Request
    model_dir, sources = tiny
    a, b = "bench-00000", "bench-00001"
    reqs = [Request(index=i, timestamp=0.0, adapter_id=aid, input_len=3 + i, output_len=2 + 3 * (i % 3),
                    adapter_index=0, prompt_token_ids=list(range(5, 8 + i)))
            for i, aid in enumerate([a, b, a, a, b, a, b, a])]
    model, _ = load_model(str(model_dir), sources, device="cpu", dtype="float32")
    results, total = run_peft_baseline(reqs, str(model_dir), sources, model=model, max_batch_size=6)
    res = {r.index: r for r in results}
    assert all(r.ok and r.completion_tokens == reqs[r.index].output_len for r in results)
    first_a = [res[i].first_token_latency for i in (0, 2, 3, 5, 7)]
    first_b = [res[i].first_token_latency for i in (1, 4, 6)]
    assert max(first_a) - min(first_a) < 1e-3 and max(first_b) - min(first_b) < 1e-3   # one prefill each
    assert min(first_b) > max(res[i].latency for i in (0, 2, 3, 5, 7))                  # b's batch after a's
    # within a batch each request ends at its own length (outputs 2, 5 and 8 tokens)
    assert res[0].latency < res[7].latency < res[2].latency



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
