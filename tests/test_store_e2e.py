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


async def _stream_all(target, reqs):
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.InferenceStub(ch)

        async def one(r):
            toks, lps = [], []
            async for m in stub.Generate(r, timeout=120):
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
