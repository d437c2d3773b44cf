"""Routing over several engines that share one adapter store: the store lists the engines from
their heartbeats (ListEngines), and the client's Router sends each request to an engine that
holds its adapter, keeps a cold adapter on one engine, and steps past an engine that is gone."""
import json

import pytest

from clients.client import Client, Unavailable
from clients.router import EngineView, Router, choose
from tests.helpers import ADAPTER_SPECS, ServerThread, make_adapter, make_model, wait_for


def _view(eid, running=0, waiting=0, resident=()):
    return EngineView(eid, f"{eid}:1", "m", running, waiting, frozenset(resident))


def test_choose_prefers_holders_then_one_engine_per_cold_adapter_then_the_least_loaded():
    a, b, c = _view("a", running=5), _view("b", running=1, resident={"x"}), _view("c", running=0, resident={"x"})
    # holders first, least loaded first; then the others
    assert [e.engine_id for e in choose([a, b, c], "x")] == ["c", "b", "a"]
    # the base model: least loaded
    assert choose([a, b, c], "")[0].engine_id == "c"
    # a cold adapter: every router picks the same engine for it, and different adapters spread out
    engines = [_view(f"e{i}") for i in range(4)]
    firsts = {choose(engines, f"adapter-{k}")[0].engine_id for k in range(40)}
    assert len(firsts) == 4
    for k in range(40):
        assert choose(engines, f"adapter-{k}")[0] is choose(list(reversed(engines)), f"adapter-{k}")[0]
    # ... unless that engine is busier than the least loaded by more than the slack
    first = choose(engines, "adapter-0")[0]
    busy = [_view(e.engine_id, running=20 if e is first else 0) for e in engines]
    assert choose(busy, "adapter-0", slack=8)[0].engine_id != first.engine_id
    assert choose(busy, "adapter-0", slack=30)[0].engine_id == first.engine_id
    # a holder far busier than the least loaded engine: the idle one goes first (and loads it)
    hot = [_view("a", running=20, resident={"x"}), _view("b", running=0)]
    assert [e.engine_id for e in choose(hot, "x", slack=8)] == ["b", "a"]
    assert [e.engine_id for e in choose(hot, "x", slack=30)] == ["a", "b"]
    # this router's own open streams count as load
    assert choose(engines, "adapter-0", {first.engine_id: 10}, slack=8)[0].engine_id != first.engine_id
    assert choose(engines, "adapter-0", {first.engine_id: 8}, slack=8)[0].engine_id == first.engine_id


@pytest.fixture
def two_engines(tmp_path, fresh_redis, monkeypatch):
    """Engine A with the embedded store, engine B sharing it (--store-target) and its Redis."""
    import server.store_link
    monkeypatch.setattr(server.store_link, "HEARTBEAT_S", 0.1)
    model_dir = make_model(tmp_path / "tiny-llama")
    cfg = json.loads((model_dir / "config.json").read_text())
    adapters = {n: make_adapter(tmp_path / n, cfg, r, a, t, seed=40 + i) for i, (n, (r, a, t)) in enumerate(ADAPTER_SPECS.items())}
    common = ["--model", str(model_dir), "--redis-url", fresh_redis.url, "--pool-mb", "4", "--dtype", "float32"]
    a = ServerThread([*common, "--data-dir", str(tmp_path / "a")])
    b = ServerThread([*common, "--data-dir", str(tmp_path / "b"), "--store-target", a.target])
    try:
        with Client(a.target) as c:
            for name, path in adapters.items():
                c.register_adapter(str(path), adapter_id=name, base_model="tiny-llama", progress=False)
        yield a, b
    finally:
        for s in (b, a):
            try:
                s.stop()
            except Exception:
                pass


def _engines(target):
    with Client(target) as c:
        return {e.address: e for e in c.list_engines()}


def test_router_sends_each_request_where_its_adapter_is(two_engines, capsys):
    a, b = two_engines
    assert wait_for(lambda: set(_engines(a.target)) == {a.target, b.target}, timeout=10)
    info = _engines(a.target)[b.target]
    assert info.base_model == "tiny-llama" and info.running == 0 and list(info.resident_adapter_ids) == []
    with Client(a.target) as c:
        assert [e.address for e in c.list_engines(base_model="other")] == []
    # B loads "attn": the router must send attn's requests there, and A never loads it
    with Client(b.target) as c:
        assert c.load_adapter("attn").loaded
    assert wait_for(lambda: "attn" in _engines(a.target)[b.target].resident_adapter_ids, timeout=10)
    with Router(a.target, refresh_s=0) as r:
        before = b.engine.stats.generated_tokens
        outs = [r.complete([5, 6, 7, 8 + i], adapter_id="attn", max_new_tokens=4, ignore_eos=True) for i in range(3)]
        assert {o.engine for o in outs} == {b.target}
        assert b.engine.stats.generated_tokens - before == 12 and "attn" not in a.engine.adapters.resident
        # a cold adapter goes to one engine, every time, which then holds it
        cold = {r.complete([9, 10], adapter_id="qv", max_new_tokens=2, ignore_eos=True).engine for _ in range(3)}
        assert len(cold) == 1
        holder = a if cold == {a.target} else b
        other = b if holder is a else a
        assert "qv" in holder.engine.adapters.resident and "qv" not in other.engine.adapters.resident
    # the CLI: the engine list with the holder marked first, and a routed generation
    from clients.cli import main
    assert main(["--target", a.target, "engines", "--adapter", "attn"]) == 0
    out = capsys.readouterr().out
    assert out.index(b.target) < out.index(a.target) and "holds attn" in out
    assert main(["--store-target", a.target, "--target", "127.0.0.1:1", "generate", "--route", "--adapter", "attn",
                 "--token-ids", "5,6", "--max-new-tokens", "2", "--ignore-eos"]) == 0
    assert f"engine {b.target}" in capsys.readouterr().err
    # the same greedy tokens from either engine (same model, same adapter weights)
    with Router(a.target) as r, Client(a.target) as c:
        ref = r.complete([11, 12, 13], adapter_id="attn", max_new_tokens=6, ignore_eos=True)
        assert ref.engine == b.target
        assert c.complete([11, 12, 13], adapter_id="attn", max_new_tokens=6, ignore_eos=True).token_ids == ref.token_ids


def test_router_steps_past_an_engine_that_is_gone(two_engines):
    a, b = two_engines
    with Client(b.target) as c:
        assert c.load_adapter("full").loaded
    assert wait_for(lambda: "full" in _engines(a.target).get(b.target, EngineView("", "", "", 0, 0)).resident_adapter_ids,
                    timeout=10)
    with Router(a.target, refresh_s=60, down_s=60) as r:
        assert r.plan("full")[0].address == b.target      # (the list is now cached for a minute)
        b.stop()
        # B's heartbeat has not expired yet: the router tries it, gets UNAVAILABLE before any
        # token, and the request runs on A
        out = r.complete([5, 6, 7], adapter_id="full", max_new_tokens=3, ignore_eos=True)
        assert out.engine == a.target and len(out.token_ids) == 3
        assert r.plan("full")[0].address == a.target      # B is skipped while marked down
    # no engine of the model asked for: a clear UNAVAILABLE
    with Router(a.target, base_model="no-such-model") as r, pytest.raises(Unavailable, match="no engine heartbeats"):
        r.complete([5], max_new_tokens=1)


def test_router_keeps_routing_while_the_store_is_down(two_engines, fresh_redis):
    """Redis (so ListEngines) goes away: the engines still serve what they hold, and the router
    routes on the last list it had instead of failing every request."""
    a, b = two_engines
    with Client(b.target) as c:
        assert c.load_adapter("attn").loaded
    assert wait_for(lambda: "attn" in _engines(a.target).get(b.target, EngineView("", "", "", 0, 0)).resident_adapter_ids,
                    timeout=10)
    with Router(a.target, refresh_s=0) as r:
        assert r.complete([5, 6], adapter_id="attn", max_new_tokens=2, ignore_eos=True).engine == b.target
        fresh_redis.stop()
        try:
            for _ in range(3):    # every call tries to refresh, fails, and routes on the last list
                out = r.complete([5, 6], adapter_id="attn", max_new_tokens=2, ignore_eos=True)
                assert out.engine == b.target and len(out.token_ids) == 2
        finally:
            fresh_redis.start()


def test_the_advertised_address_is_dialable():
    from server.store_link import advertised_address
    import socket
    assert advertised_address("127.0.0.1", 50051) == "127.0.0.1:50051"
    assert advertised_address("0.0.0.0", 7) == f"{socket.gethostname()}:7"
    assert advertised_address("::1", 7) == "[::1]:7"
    assert advertised_address("0.0.0.0", 7, "engine:50051") == "engine:50051"
