"""The control plane end to end: adapters registered through RegisterAdapter, fetched cold from
the store into the engine's pool, served in one mixed batch, and what happens when Redis dies."""
import asyncio
import json
import random
import time

import grpc
import pytest

from adapter_store.services import RedisServer
from clients.client import Client
from clients.pb import loraserve_pb2 as pb
from clients.pb import loraserve_pb2_grpc as pb_grpc
from tests.helpers import ADAPTER_SPECS, ServerThread, hf_reference, make_adapter, make_model, wait_for

N_NEW = 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("store-e2e")
    model_dir = make_model(d / "tiny-llama")
    cfg = json.loads((model_dir / "config.json").read_text())
    adapters = {n: make_adapter(d / n, cfg, r, a, t, seed=20 + i) for i, (n, (r, a, t)) in enumerate(ADAPTER_SPECS.items())}
    return d, model_dir, adapters


async def _stream_all(target, reqs, timeout=120):
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.InferenceStub(ch)

        async def one(r):
            toks, lps = [], []
            async for m in stub.Generate(r, timeout=timeout):
                toks += m.token_ids
                lps += m.logprobs
            return toks, lps
        return await asyncio.gather(*[one(r) for r in reqs])


@pytest.mark.parametrize("procs", ["0", "2"])
def test_registered_adapters_fetched_cold_match_peft(tiny, fresh_redis, procs):
    """procs: cold fetches in engine threads, or parsed and staged in 2 worker processes that
    hand the page images back through shared memory."""
    d, model_dir, adapters = tiny
    srv = ServerThread(["--model", str(model_dir), "--data-dir", str(d / f"data1-{procs}"), "--redis-url",
                        fresh_redis.url, "--pool-mb", "4", "--dtype", "float32", "--fetch-processes", procs])
    try:
        with Client(srv.target) as c:
            for name, path in adapters.items():
                info = c.register_adapter(str(path), adapter_id=name, base_model="tiny-llama", progress=False)
                assert info.rank == ADAPTER_SPECS[name][0]
            assert srv.engine.adapters.cached_ids() == []          # nothing fetched yet: cold
        rng = random.Random(3)
        names = ["attn", "full", "qv", "", "full", "attn"]
        reqs = [pb.GenerateRequest(adapter_id=n, prompt_token_ids=pb.TokenIds(ids=[rng.randrange(3, 97) for _ in range(rng.randrange(4, 30))]),
                                   params=pb.SamplingParams(max_new_tokens=N_NEW, ignore_eos=True, logprobs=True)) for n in names]
        outs = asyncio.run(_stream_all(srv.target, reqs))
        for r, (toks, lps) in zip(reqs, outs):
            ref_t, ref_lp = hf_reference(model_dir, adapters.get(r.adapter_id), list(r.prompt_token_ids.ids), N_NEW)
            assert toks == ref_t, r.adapter_id
            assert max(abs(a - b) for a, b in zip(lps, ref_lp)) < 1e-2
        assert sorted(srv.engine.adapters.resident) == ["attn", "full", "qv"]
    finally:
        srv.stop()


def test_redis_outage_resident_keeps_serving_cold_unavailable(tiny, tmp_path):
    d, model_dir, adapters = tiny
    redis = RedisServer(persist_dir=tmp_path / "redis").start()
    srv = ServerThread(["--model", str(model_dir), "--data-dir", str(tmp_path / "data"), "--redis-url", redis.url,
                        "--pool-mb", "4", "--dtype", "float32"])
    gen = lambda aid: pb.GenerateRequest(adapter_id=aid, prompt_token_ids=pb.TokenIds(ids=[5, 6, 7]),  # noqa: E731
                                         params=pb.SamplingParams(max_new_tokens=4, ignore_eos=True))
    try:
        with Client(srv.target) as c:
            for name in ("attn", "qv"):
                c.register_adapter(str(adapters[name]), adapter_id=name, base_model="tiny-llama", progress=False)
            asyncio.run(_stream_all(srv.target, [gen("attn")]))          # attn is now hot
            time.sleep(1.2)                                                 # let the AOF reach the disk
            redis.kill()
            # resident adapters and the base model keep streaming
            outs = asyncio.run(_stream_all(srv.target, [gen("attn"), gen("")]))
            assert all(len(t) == 4 for t, _ in outs)
            # a cold adapter cannot be fetched: UNAVAILABLE, with a message that says why
            with pytest.raises(grpc.aio.AioRpcError) as e:
                asyncio.run(_stream_all(srv.target, [gen("qv")]))
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(Exception) as e2:
                c.register_adapter(str(adapters["full"]), adapter_id="full", base_model="tiny-llama", progress=False)
            assert "UNAVAILABLE" in str(e2.value) or getattr(e2.value, "code", None) == grpc.StatusCode.UNAVAILABLE
            # Redis comes back: everything recovers without restarting the server
            redis.restart()
            assert wait_for(lambda: _try(lambda: asyncio.run(_stream_all(srv.target, [gen("qv")]))), timeout=20)
            c.register_adapter(str(adapters["full"]), adapter_id="full", base_model="tiny-llama", progress=False)
            assert len(asyncio.run(_stream_all(srv.target, [gen("full")]))[0][0]) == 4
    finally:
        srv.stop()
        redis.close()


def _try(fn) -> bool:
    try:
        fn()
        return True
    except Exception:
        return False


def test_replace_is_seen_by_the_engine(tiny, fresh_redis):
    """A replaced adapter is dropped by the engine (events channel); the next request uses the
    new weights, never a mix."""
    d, model_dir, adapters = tiny
    srv = ServerThread(["--model", str(model_dir), "--data-dir", str(d / "data3"), "--redis-url", fresh_redis.url,
                        "--pool-mb", "4", "--dtype", "float32"])
    req = pb.GenerateRequest(adapter_id="x", prompt_token_ids=pb.TokenIds(ids=[9, 8, 7, 6]),
                             params=pb.SamplingParams(max_new_tokens=N_NEW, ignore_eos=True))
    try:
        with Client(srv.target) as c:
            c.register_adapter(str(adapters["attn"]), adapter_id="x", base_model="tiny-llama", progress=False)
            first = asyncio.run(_stream_all(srv.target, [req]))[0][0]
            assert first == hf_reference(model_dir, adapters["attn"], [9, 8, 7, 6], N_NEW)[0]
            c.register_adapter(str(adapters["full"]), adapter_id="x", base_model="tiny-llama", replace=True, progress=False)
            assert wait_for(lambda: "x" not in srv.engine.adapters.resident, timeout=10)
            second = asyncio.run(_stream_all(srv.target, [req]))[0][0]
            assert second == hf_reference(model_dir, adapters["full"], [9, 8, 7, 6], N_NEW)[0]
            assert first != second
    finally:
        srv.stop()


def test_delete_evicts_from_engine_running_requests_finish(tiny, fresh_redis):
    """DeleteAdapter: the engine drops the adapter (events channel), a request already running on
    it finishes with all its tokens, and new requests get NOT_FOUND."""
    d, model_dir, adapters = tiny
    srv = ServerThread(["--model", str(model_dir), "--data-dir", str(d / "data4"), "--redis-url", fresh_redis.url,
                        "--pool-mb", "4", "--dtype", "float32"])
    long_req = pb.GenerateRequest(adapter_id="gone", prompt_token_ids=pb.TokenIds(ids=[4, 5, 6]),
                                  params=pb.SamplingParams(max_new_tokens=300, ignore_eos=True))
    try:
        with Client(srv.target) as c:
            c.register_adapter(str(adapters["qv"]), adapter_id="gone", base_model="tiny-llama", progress=False)

            async def run_and_delete():
                async with grpc.aio.insecure_channel(srv.target) as ch:
                    got = 0
                    async for m in pb_grpc.InferenceStub(ch).Generate(long_req, timeout=120):
                        got += len(m.token_ids)
                        if got == 5:         # running now: delete it under the request
                            await asyncio.to_thread(c.delete_adapter, "gone")
                    return got, m
            got, last = asyncio.run(run_and_delete())
            assert got == 300 and last.finish_reason == pb.FINISH_REASON_LENGTH
            assert wait_for(lambda: "gone" not in srv.engine.adapters.resident, timeout=10)
            assert "gone" not in srv.engine.adapters.cached_ids()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                asyncio.run(_stream_all(srv.target, [long_req]))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            assert srv.engine.pool.adapter_pages == 0
    finally:
        srv.stop()


def _raw_generate(target, aid, n=N_NEW):
    """Generate through a bare stub (no client-side retry): what the engine itself answers."""
    with grpc.insecure_channel(target) as ch:
        req = pb.GenerateRequest(adapter_id=aid, prompt_token_ids=pb.TokenIds(ids=[9, 8, 7, 6]),
                                 params=pb.SamplingParams(max_new_tokens=n, ignore_eos=True))
        return [t for m in pb_grpc.InferenceStub(ch).Generate(req, timeout=60) for t in m.token_ids]


@pytest.mark.parametrize("race", ["engine-fetch-overtaken", "store-read-overtaken"])
def test_a_replace_during_a_fetch_serves_the_new_version(tiny, fresh_redis, monkeypatch, race):
    """The replace lands while the engine is still fetching the old version.
    engine-fetch-overtaken: the engine has the old bytes and is still parsing them when the
    replaced event drops the adapter: what lands must not be cached (it was, for good).
    store-read-overtaken: the store's blob read is slow (S3 latency) and the replace deletes the
    old blob under it: the store answers ABORTED, and the engine must fetch again, not fail the
    waiting requests."""
    import threading
    import time

    from adapter_store import objstore
    from server.store_link import StoreSource
    d, model_dir, adapters = tiny
    armed = threading.Event()
    if race == "engine-fetch-overtaken":
        real = StoreSource.fetch

        def slow_fetch(self, adapter_id, *a, **kw):
            out = real(self, adapter_id, *a, **kw)
            if armed.is_set():
                armed.clear()
                time.sleep(1.0)
            return out
        monkeypatch.setattr(StoreSource, "fetch", slow_fetch)
    else:
        real_get = objstore.FileStore.get

        def slow_get(self, key, *a, **kw):
            delay = armed.is_set()
            armed.clear()

            def chunks():      # the store reads blobs in a producer thread, as from S3
                if delay:
                    time.sleep(1.0)
                yield from real_get(self, key, *a, **kw)
            return chunks()
        monkeypatch.setattr(objstore.FileStore, "get", slow_get)
    srv = ServerThread(["--model", str(model_dir), "--data-dir", str(d / f"data-{race}"), "--redis-url",
                        fresh_redis.url, "--pool-mb", "4", "--dtype", "float32"])
    try:
        with Client(srv.target) as c:
            c.register_adapter(str(adapters["attn"]), adapter_id="x", base_model="tiny-llama", progress=False)
            armed.set()
            out = {}
            t = threading.Thread(target=lambda: out.setdefault("tokens", _raw_generate(srv.target, "x")))
            t.start()
            time.sleep(0.4)
            c.register_adapter(str(adapters["full"]), adapter_id="x", base_model="tiny-llama", replace=True,
                               progress=False)
            t.join(60)
            new = hf_reference(model_dir, adapters["full"], [9, 8, 7, 6], N_NEW)[0]
            assert out.get("tokens") == new          # the request waiting during the race: version 2
            assert _raw_generate(srv.target, "x") == new
            assert {a: r.version for a, r in srv.engine.adapters.resident.items()} == {"x": 2}
    finally:
        srv.stop()


def test_events_missed_while_unsubscribed_are_caught_up(tiny, fresh_redis):
    """The engine's event subscription drops (a Redis blip) and a delete is published meanwhile:
    on reconnecting, the engine re-checks what it holds and drops the deleted adapter."""
    import redis as redislib
    d, model_dir, adapters = tiny
    srv = ServerThread(["--model", str(model_dir), "--data-dir", str(d / "data-missed"), "--redis-url",
                        fresh_redis.url, "--pool-mb", "4", "--dtype", "float32"])
    r = redislib.Redis.from_url(fresh_redis.url)
    subscribers = lambda: r.pubsub_numsub("loraserve:events")[0][1]  # noqa: E731
    try:
        with Client(srv.target) as c:
            for aid in ("x", "y"):
                c.register_adapter(str(adapters["attn"]), adapter_id=aid, base_model="tiny-llama", progress=False)
                assert _raw_generate(srv.target, aid, 2)
            assert wait_for(lambda: subscribers() >= 1, timeout=10)
            assert r.client_kill_filter(_type="pubsub") >= 1
            c.delete_adapter("x")                       # nobody hears this one
            assert wait_for(lambda: "x" not in srv.engine.adapters.resident, timeout=15)
            assert "x" not in srv.engine.adapters.cached_ids() and "y" in srv.engine.adapters.resident
            with pytest.raises(grpc.RpcError) as e:
                _raw_generate(srv.target, "x", 2)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        srv.stop()


def test_many_cold_adapters_at_once_on_the_embedded_store(tiny, fresh_redis):
    """Forty requests for forty cold adapters at once. Each request's existence check is a
    blocking call into this same server's store; on one shared thread pool those checks took
    every thread the store's handlers needed, and all of them stalled until a 30 s timeout
    (some then failed UNAVAILABLE)."""
    d, model_dir, adapters = tiny
    srv = ServerThread(["--model", str(model_dir), "--data-dir", str(d / "data-cold"), "--redis-url", fresh_redis.url,
                        "--pool-mb", "4", "--dtype", "float32"])
    ids = [f"c{i}" for i in range(40)]
    try:
        with Client(srv.target) as c:
            for i, aid in enumerate(ids):
                c.register_adapter(str(list(adapters.values())[i % len(adapters)]), adapter_id=aid,
                                   base_model="tiny-llama", progress=False)
        assert not any(a in srv.engine.adapters.cached_ids() for a in ids)         # all cold
        reqs = [pb.GenerateRequest(adapter_id=a, prompt_token_ids=pb.TokenIds(ids=[5, 6]),
                                   params=pb.SamplingParams(max_new_tokens=2, ignore_eos=True)) for a in ids]
        outs = asyncio.run(_stream_all(srv.target, reqs, timeout=20))   # (the stall lasted the lookups' 30 s)
        assert [len(t) for t, _ in outs] == [2] * len(ids)
    finally:
        srv.stop()


def test_load_adapter_answers_when_an_unload_overtakes_its_fetch(tiny, fresh_redis, monkeypatch):
    """EngineAdmin.LoadAdapter waits for the adapter's fetch; an unload (or a delete or replace
    event) that drops that fetch must not leave it waiting forever: it fetches again."""
    import threading
    import time

    from server.store_link import StoreSource
    d, model_dir, adapters = tiny
    real = StoreSource.fetch

    def slow_fetch(self, adapter_id, *a, **kw):
        out = real(self, adapter_id, *a, **kw)
        time.sleep(0.5)
        return out
    monkeypatch.setattr(StoreSource, "fetch", slow_fetch)
    srv = ServerThread(["--model", str(model_dir), "--data-dir", str(d / "data-load"), "--redis-url", fresh_redis.url,
                        "--pool-mb", "4", "--dtype", "float32"])
    try:
        with Client(srv.target, timeout=20) as c:
            c.register_adapter(str(adapters["full"]), adapter_id="x", base_model="tiny-llama", progress=False)
            out = {}
            t = threading.Thread(target=lambda: out.setdefault("load", c.load_adapter("x")))
            t.start()
            assert wait_for(lambda: "x" in srv.engine.adapters._fetches, timeout=10)
            assert c.unload_adapter("x") is False             # nothing held yet: it only drops the fetch
            t.join(30)
            assert out["load"].loaded and out["load"].pages > 0 and "x" in srv.engine.adapters.resident
    finally:
        srv.stop()
