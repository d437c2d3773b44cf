"""GPU-only: the CUDA-graph decode path against eager steps and transformers+peft, at batch
sizes that need padding rows (3, 6 -> buckets 4, 8), one request, adapters shared by several
requests (grouped decode LoRA), and adapters loaded later."""
import json

import pytest
import torch

from server.lora import load_peft_dir
from server.request import Request
from server.runtime import EngineConfig, build_engine
from tests.helpers import ADAPTER_SPECS, hf_reference, make_adapter, make_model, run_engine
from tests.test_engine import check_table_holds, greedy, mixed_requests

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

N_NEW = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu")
    model_dir = make_model(d / "model")
    cfg = json.loads((model_dir / "config.json").read_text())
    return model_dir, {n: make_adapter(d / n, cfg, r, a, t, seed=40 + i) for i, (n, (r, a, t)) in enumerate(ADAPTER_SPECS.items())}


@pytest.mark.parametrize("graphs", [True, False])
@pytest.mark.parametrize("names", [["full"], ["attn", "", "qv"], ["qv", "full", "", "attn", "full", ""],
                                   # adapters shared by several requests: the grouped decode schedule
                                   ["full", "qv", "full", "", "qv", "full", "wide", "full"]])
def test_graph_and_eager_decode_match_peft(tiny, graphs, names, monkeypatch):
    model_dir, adapters = tiny
    if len(names) == 8:     # 7 adapter requests over 3 adapters: group them (the default needs 6 each)
        import server.engine
        monkeypatch.setattr(server.engine, "GROUP_MIN_TOKENS", 2)
    engine, _ = build_engine(EngineConfig(str(model_dir), dtype="float32", pool_mb=8, cuda_graphs=graphs))
    check_against_peft(engine, model_dir, adapters, mixed_requests(names, seed=len(names)), 1e-2)


def check_against_peft(engine, model_dir, adapters, reqs, tol, ref_adapters=None) -> None:
    """Start the engine, load the adapters after its graphs were captured (the store's cold
    path), run the requests, and compare each with transformers + peft (on ``ref_adapters`` where
    given, else the same adapters): the same greedy tokens, log-probabilities within tol."""
    ref_adapters = ref_adapters or adapters
    engine.start()
    try:
        for name, path in adapters.items():
            engine.adapters.add_weights(load_peft_dir(name, path, engine.cfg))
        outs = run_engine(engine, reqs)
    finally:
        engine.stop()
    for r in reqs:
        ref_t, ref_lp = hf_reference(model_dir, ref_adapters.get(r.adapter_id), r.prompt_ids, N_NEW)
        assert outs[r.request_id][0] == ref_t, r.adapter_id
        assert max(abs(a - b) for a, b in zip(outs[r.request_id][1], ref_lp)) < tol, r.adapter_id


@pytest.mark.parametrize("int8_tiles_from", [None, 1], ids=["default-tiles", "int8-tiles"])
@pytest.mark.parametrize("graphs", [True, False])
def test_int8_adapter_rows_match_peft_within_their_error(tiny, graphs, int8_tiles_from, monkeypatch):
    """--adapter-dtype int8 on the GPU (graph-captured and eager decode, the grouped schedule
    included): the same greedy tokens as PEFT on the full-precision weights, log-probabilities
    within the int8 bound the CPU test uses. int8-tiles: the int8 decode tiles (PDL launches on
    sm_90+) at this small batch too, as 256-request steps run them."""
    import server.engine
    from kernels import triton_lora
    monkeypatch.setattr(server.engine, "GROUP_MIN_TOKENS", 2)
    if int8_tiles_from is not None:
        monkeypatch.setattr(triton_lora, "INT8_SMALL_TILES_MIN_T", int8_tiles_from)
    model_dir, adapters = tiny
    engine, _ = build_engine(EngineConfig(str(model_dir), dtype="float32", pool_mb=8, cuda_graphs=graphs,
                                          adapter_dtype="int8"))
    names = ["full", "qv", "full", "", "qv", "full", "wide", "attn"]
    check_against_peft(engine, model_dir, adapters, mixed_requests(names, seed=5), 3e-2)


@pytest.mark.parametrize("graphs", [True, False])
def test_int4_adapter_rows_match_peft_on_their_int4_weights(tiny, graphs, monkeypatch, tmp_path):
    """--adapter-dtype int4 on the GPU (graph-captured and eager decode, the grouped schedule
    included): the engine computes the model whose adapters are its int4 rows, so against PEFT on
    the int4-rounded weights the same greedy tokens and log-probabilities within the fp32 bound."""
    import server.engine
    from tests.test_engine import int4_round_trip_adapter
    monkeypatch.setattr(server.engine, "GROUP_MIN_TOKENS", 2)
    model_dir, adapters = tiny
    engine, _ = build_engine(EngineConfig(str(model_dir), dtype="float32", pool_mb=8, cuda_graphs=graphs,
                                          adapter_dtype="int4"))
    rounded = {n: int4_round_trip_adapter(p, tmp_path / n) for n, p in adapters.items()}
    names = ["full", "qv", "full", "", "qv", "full", "wide", "attn"]
    check_against_peft(engine, model_dir, adapters, mixed_requests(names, seed=5), 1e-2, ref_adapters=rounded)


def test_adapter_loads_and_evictions_never_wait_for_the_device(tiny):
    """Inserting an adapter and removing one (which compacts the row table and moves the later
    adapters' row starts) only queue work: with a second of device work queued ahead, both return
    while it still runs. Afterwards every adapter's rows still read back as its weights."""
    from server.pool import AdapterTable, stage_adapter

    model_dir, adapters = tiny
    engine, _ = build_engine(EngineConfig(str(model_dir), dtype="float32", pool_mb=8, cuda_graphs=False))
    pool = engine.pool
    table = AdapterTable(pool, 8)
    loaded = {n: load_peft_dir(n, p, engine.cfg) for n, p in adapters.items()}
    staged = {n: stage_adapter(w, pool, pin=True) for n, w in loaded.items()}
    slots = {n: table.insert(staged[n]).slot for n in ("attn", "full", "qv")}
    table.remove(slots.pop("qv"))           # once untimed, so every kernel both paths use is loaded
    slots["qv"] = table.insert(staged["qv"]).slot
    side = torch.cuda.Stream()
    torch.cuda.synchronize()

    torch.cuda._sleep(2_000_000_000)        # ~1 s of device time queued on the default stream
    table.remove(slots.pop("attn"))         # the first adapter: every later row start moves
    slots["wide"] = table.insert(staged["wide"], side).slot
    still_running = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert still_running, "an adapter insert or remove waited for the queued device work"

    check_table_holds(table, {slots[n]: loaded[n] for n in slots})
    engine.adapters.close()
