"""The client library against a real server on loopback (the ``live_server`` fixture of
tests/conftest.py: ``.target`` host:port, ``.adapters`` registered adapter ids)."""
from __future__ import annotations

import asyncio
import json
import pathlib
import socket
import time
import uuid

import grpc
import pytest

from clients import client as cl
from clients.client import (AlreadyExists, AsyncClient, Client, DeadlineExceeded, InvalidArgument, LoraServeError,
                            NotFound, RetryPolicy, Unavailable)


@pytest.fixture
def c(server):
    with Client(server.target, timeout=60) as client:
        yield client


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adapter_folder(client: Client, server, dest: pathlib.Path) -> pathlib.Path:
    """A valid PEFT folder for the live server's base model: an existing adapter fetched back."""
    fetched = client.fetch_adapter(server.adapters[0])
    assert fetched.info.adapter_id == server.adapters[0]
    if fetched.files.get(cl.WEIGHTS_FILE):
        return fetched.save(dest)
    # a store that sends no weights for this adapter: build one for the server's model
    from server.config import ModelConfig
    from server.demo import DEMO_CONFIG
    from tests.helpers import make_adapter
    model_dir = getattr(server, "model_dir", None)
    cfg = ModelConfig.from_dir(model_dir).raw if model_dir else DEMO_CONFIG
    return make_adapter(dest, cfg, rank=4, alpha=8, targets=["q_proj", "v_proj"], seed=1)


# ---------------------------------------------------------------------------------------- data plane

def test_health(c):
    assert c.health() == "SERVING"


def test_generate_streams_exact_lengths(c, server):
    prompt = [5, 6, 7, 8, 9]
    chunks = list(c.generate(prompt_token_ids=prompt, max_new_tokens=6, ignore_eos=True))
    assert chunks and chunks[-1].finished and not any(ch.finished for ch in chunks[:-1])
    ids = [t for ch in chunks for t in ch.token_ids]
    assert len(ids) == 6
    last = chunks[-1]
    assert last.finish_reason == "length"
    assert last.usage.prompt_tokens == len(prompt) and last.usage.completion_tokens == 6
    # complete() joins the same stream (greedy: same tokens)
    res = c.complete(prompt, max_new_tokens=6, ignore_eos=True)
    assert res.token_ids == ids and res.text == "".join(ch.text for ch in chunks)
    assert res.finish_reason == "length" and res.usage.completion_tokens == 6
    assert 0 < res.first_token_latency <= res.latency


def test_generate_with_adapter_text_prompt_and_logprobs(c, server):
    res = c.complete("Hello there", adapter_id=server.adapters[0], max_new_tokens=4, ignore_eos=True,
                     logprobs=True, request_id="client-test-1")
    assert len(res.token_ids) == 4 and len(res.logprobs) == 4
    assert all(lp <= 1e-6 for lp in res.logprobs)
    assert res.usage.prompt_tokens > 0


def test_seeded_sampling_is_reproducible(c):
    kw = dict(prompt_token_ids=[3, 4, 5], max_new_tokens=8, ignore_eos=True, temperature=1.0, top_p=0.9,
              top_k=50, seed=1234)
    assert c.complete(**kw).token_ids == c.complete(**kw).token_ids


def test_typed_errors(c, server):
    with pytest.raises(NotFound) as e:
        c.complete("hi", adapter_id=_uid("missing"), max_new_tokens=2)
    assert e.value.code == grpc.StatusCode.NOT_FOUND and e.value.details
    assert isinstance(e.value, LoraServeError)
    with pytest.raises(InvalidArgument) as e:
        c.complete("hi", max_new_tokens=2, temperature=-1.0)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(InvalidArgument):        # caught before any RPC
        c.complete(max_new_tokens=2)
    with pytest.raises(NotFound):
        c.get_adapter(_uid("missing"))
    # values a field cannot hold: the library's InvalidArgument, naming the field, before any RPC
    for kw, field in ((dict(max_new_tokens=-5), "max_new_tokens=-5"), (dict(seed=-1), "seed=-1"),
                      (dict(top_k=2 ** 40), "top_k="), (dict(temperature="hot"), "temperature='hot'")):
        with pytest.raises(InvalidArgument, match=field):
            c.complete("hi", **kw)
    with pytest.raises(InvalidArgument, match="ids="):
        c.complete([1, 2 ** 40])
    with pytest.raises(InvalidArgument, match="prompt is bytes"):
        c.complete(b"hello")
    # what int() / float() accepted before still works
    assert len(c.complete("hi", max_new_tokens=2.0, temperature="0", ignore_eos=True).token_ids) == 2
    assert len(c.complete([5.0, "6"], max_new_tokens=1).token_ids) == 1
    with pytest.raises(InvalidArgument, match="page_size=-1"):
        list(c.list_adapters(page_size=-1))
    with pytest.raises(InvalidArgument, match="rank=-1"):
        c.register_synthetic(_uid("neg"), rank=-1)


def test_deadline(c):
    with pytest.raises(DeadlineExceeded) as e:
        c.complete([5, 6, 7], max_new_tokens=500, ignore_eos=True, timeout=0.05)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_closing_the_stream_early_cancels(c):
    it = c.generate([5, 6, 7], max_new_tokens=400, ignore_eos=True)
    first = next(it)
    assert first.token_ids or first.text is not None
    it.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        s = c.stats()
        if s.running == 0 and s.waiting == 0:
            break
        time.sleep(0.05)
    assert c.stats().running == 0
    assert len(c.complete([1, 2], max_new_tokens=2, ignore_eos=True).token_ids) == 2


def test_stats_account_the_engine_time(c):
    """GetStats' time sums: a window over one generation has its prefill step, its decode steps,
    and busy time split into device, host and outside-step shares that add up."""
    before = c.stats()
    out = c.complete([5, 6, 7, 8], max_new_tokens=6, ignore_eos=True)
    assert len(out.token_ids) == 6
    after = c.stats()
    t = after.time_window(before)
    assert t["steps"] >= 6 and t["prefill_steps"] >= 1 and t["prefill_tokens"] >= 4
    assert t["busy_s"] > 0 and t["ms_per_step"] > 0
    assert t["device_share"] > 0 and t["host_share"] > 0
    assert abs(t["device_share"] + t["host_share"] + t["outside_share"] - 1) < 0.01
    assert 0 < t["gpu_share"] <= 1.0    # (without CUDA: the steps' compute time)
    assert after.decode_window(before)["decode_steps"] >= 5


# ---------------------------------------------------------------------------------------- control plane

def test_register_get_list_delete(c, server, tmp_path):
    folder = adapter_folder(c, server, tmp_path / "a")
    aid = _uid("reg")
    info = c.register_adapter(folder, aid, progress=False)
    assert info.adapter_id == aid and info.rank > 0 and info.target_modules
    assert info.sha256 and info.size_bytes == (folder / cl.WEIGHTS_FILE).stat().st_size
    got = c.get_adapter(aid)
    assert got.adapter_id == aid and got.rank == info.rank and got.sha256 == info.sha256
    # listing walks every page
    ids = [a.adapter_id for a in c.list_adapters(page_size=1)]
    assert aid in ids and set(server.adapters) <= set(ids)
    assert len(ids) == len(set(ids))
    assert ids == [a.adapter_id for a in c.list_adapters()] or set(ids) == {a.adapter_id for a in c.list_adapters()}
    with pytest.raises(AlreadyExists):
        c.register_adapter(folder, aid, progress=False)
    again = c.register_adapter(folder, aid, replace=True, progress=False)
    assert again.adapter_id == aid
    # the new adapter serves requests
    assert len(c.complete([5, 6], adapter_id=aid, max_new_tokens=3, ignore_eos=True).token_ids) == 3
    assert c.delete_adapter(aid) is True
    with pytest.raises(NotFound):
        c.get_adapter(aid)
    assert aid not in [a.adapter_id for a in c.list_adapters()]


def test_register_rejects_bad_folders(c, tmp_path):
    with pytest.raises(InvalidArgument, match="missing adapter_config.json"):
        c.register_adapter(tmp_path, _uid("x"), progress=False)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4}))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x02pickle")
    with pytest.raises(InvalidArgument, match="pickled"):
        c.register_adapter(tmp_path, _uid("x"), progress=False)


def test_register_invalid_adapter_is_refused_by_the_store(c, server, tmp_path):
    folder = adapter_folder(c, server, tmp_path / "a")
    (folder / cl.CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "r": 0, "target_modules": ["q_proj"]}))
    with pytest.raises(InvalidArgument):
        c.register_adapter(folder, _uid("bad"), progress=False)


def test_register_synthetic(c):
    aid = _uid("syn")
    info = c.register_synthetic(aid, rank=8, target_modules="q_proj,v_proj", seed=3)
    assert info.adapter_id == aid and info.rank == 8 and info.synthetic
    assert sorted(info.target_modules) == ["q_proj", "v_proj"]
    assert info.alpha == 16           # alpha 0: 2 * rank
    assert len(c.complete([4, 5, 6], adapter_id=aid, max_new_tokens=3, ignore_eos=True).token_ids) == 3
    assert c.delete_adapter(aid)


def test_fetch_adapter(c, server, tmp_path):
    f = c.fetch_adapter(server.adapters[0])
    assert f.info.adapter_id == server.adapters[0] and f.info.rank > 0
    with pytest.raises(NotFound):
        c.fetch_adapter(_uid("missing"))


def test_load_unload_stats(c, server):
    aid = server.adapters[0]
    r = c.load_adapter(aid)
    assert r.loaded and r.pages > 0
    s = c.stats()
    assert aid in s.resident_adapters
    assert s.pool.total_pages >= s.pool.free_pages and s.pool.adapter_pages > 0
    assert s.model and s.device and s.dtype
    assert c.unload_adapter(aid) is True
    assert aid not in c.stats().resident_adapters
    with pytest.raises(NotFound):
        c.load_adapter(_uid("missing"))
    for call in (c.load_adapter, c.unload_adapter):
        with pytest.raises(InvalidArgument, match="adapter_id is required"):
            call("")


# ---------------------------------------------------------------------------------------- retries, auth

def test_unavailable_is_retried_with_backoff_for_safe_calls():
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.2, max_backoff=1.0, multiplier=2.0)
    with Client(f"127.0.0.1:{_free_port()}", retry=policy, timeout=10) as client:
        t0 = time.monotonic()
        with pytest.raises(Unavailable) as e:
            client.get_adapter("x")
        waited = time.monotonic() - t0
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        # two pauses: >= 0.5 * (0.2 + 0.4)
        assert waited >= 0.3
        t0 = time.monotonic()
        with pytest.raises(Unavailable):
            client.delete_adapter("x")          # unsafe: one attempt, no backoff pause
        assert time.monotonic() - t0 < waited


def test_retry_policy_delays():
    p = RetryPolicy(initial_backoff=0.1, max_backoff=0.5, multiplier=2.0)
    for k, cap in enumerate([0.1, 0.2, 0.4, 0.5, 0.5]):
        d = p.delay(k)
        assert cap * 0.5 <= d <= cap


def test_token_metadata():
    c = Client("127.0.0.1:1", token="s3cret")
    try:
        assert c._metadata() == (("authorization", "Bearer s3cret"),)
    finally:
        c.close()
    c = Client("127.0.0.1:1")
    try:
        assert c._metadata() is None
    finally:
        c.close()


def test_env_target_and_token(monkeypatch):
    monkeypatch.setenv("LORASERVE_TARGET", "127.0.0.1:4242")
    monkeypatch.setenv("LORASERVE_TOKEN", "tok")
    c = Client()
    try:
        assert c.target == "127.0.0.1:4242" and c.token == "tok"
    finally:
        c.close()


# ---------------------------------------------------------------------------------------- async

def test_async_client(server):
    async def main():
        async with AsyncClient(server.target, timeout=60) as ac:
            assert await ac.health() == "SERVING"
            outs = await asyncio.gather(*(ac.complete([5, 6, 7 + i], adapter_id=server.adapters[i % len(server.adapters)],
                                                      max_new_tokens=4, ignore_eos=True) for i in range(8)))
            assert all(len(o.token_ids) == 4 and o.finish_reason == "length" for o in outs)
            chunks = [ch async for ch in ac.generate([1, 2, 3], max_new_tokens=3, ignore_eos=True)]
            assert chunks[-1].finished
            ids = [a.adapter_id async for a in ac.list_adapters(page_size=1)]
            assert set(server.adapters) <= set(ids)
            info = await ac.get_adapter(server.adapters[0])
            assert info.adapter_id == server.adapters[0]
            with pytest.raises(NotFound):
                await ac.complete("x", adapter_id=_uid("missing"), max_new_tokens=2)
            aid = _uid("asyn")
            info = await ac.register_synthetic(aid, rank=4, target_modules=["q_proj"], seed=1)
            assert info.rank == 4
            assert await ac.delete_adapter(aid)
            s = await ac.stats()
            assert s.pool.total_pages > 0
            f = await ac.fetch_adapter(server.adapters[0])
            assert f.info.adapter_id == server.adapters[0]
            with pytest.raises(DeadlineExceeded):
                await ac.complete([5, 6], max_new_tokens=500, ignore_eos=True, timeout=0.05)

    asyncio.run(main())


def test_async_register_folder(server, tmp_path):
    with Client(server.target) as c:
        folder = adapter_folder(c, server, tmp_path / "a")

    async def main():
        async with AsyncClient(server.target) as ac:
            aid = _uid("areg")
            info = await ac.register_adapter(folder, aid, progress=False)
            assert info.adapter_id == aid
            assert await ac.delete_adapter(aid)

    asyncio.run(main())


def test_separate_store_target(server):
    """AdapterStore RPCs go to store_target; Inference/EngineAdmin to target (compose layout)."""
    with Client(f"127.0.0.1:{_free_port()}", store_target=server.target, timeout=5,
                retry=RetryPolicy(max_attempts=1)) as c:
        assert server.adapters[0] in [a.adapter_id for a in c.list_adapters()]
        assert c.get_adapter(server.adapters[0]).rank > 0
        with pytest.raises(Unavailable):
            c.complete([1, 2], max_new_tokens=1)
