"""The data plane over real gRPC on loopback: streaming, concurrency, bad input, cancellation."""
import asyncio
import json

import grpc
import pytest

from clients.pb import loraserve_pb2 as pb
from clients.pb import loraserve_pb2_grpc as pb_grpc
from server.demo import DEMO_CONFIG
from tests.helpers import ServerThread, make_adapter, make_model, wait_for


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """The demo model (it has a tokenizer) with two local adapters, no store."""
    d = tmp_path_factory.mktemp("grpc")
    a = make_adapter(d / "a", DEMO_CONFIG, 8, 16, ["q_proj", "k_proj", "v_proj", "o_proj"], seed=1)
    b = make_adapter(d / "b", DEMO_CONFIG, 32, 32, ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], seed=2)
    srv = ServerThread(["--no-store", "--data-dir", str(d / "data"), "--adapter", f"a={a}", "--adapter", f"b={b}",
                        "--pool-mb", "16", "--max-model-len", "512"])
    yield srv
    srv.stop()


def gen(target, req, timeout=60):
    async def go():
        async with grpc.aio.insecure_channel(target) as ch:
            return [m async for m in pb_grpc.InferenceStub(ch).Generate(req, timeout=timeout)]
    return asyncio.run(go())


def greq(**kw):
    params = kw.pop("params", {})
    return pb.GenerateRequest(params=pb.SamplingParams(**params), **kw)


def test_stream_text_usage_and_logprobs(demo_server):
    msgs = gen(demo_server.target, greq(prompt="Hello", adapter_id="a",
                                        params=dict(max_new_tokens=10, ignore_eos=True, logprobs=True)))
    assert sum(len(m.token_ids) for m in msgs) == 10
    assert all(len(m.logprobs) == len(m.token_ids) for m in msgs)
    assert all(lp <= 0 for m in msgs for lp in m.logprobs)
    last = msgs[-1]
    assert last.finished and last.finish_reason == pb.FINISH_REASON_LENGTH
    assert last.usage.prompt_tokens == 6 and last.usage.completion_tokens == 10
    assert not any(m.finished for m in msgs[:-1])
    assert "".join(m.text for m in msgs)   # the demo tokenizer decodes to printable text


@pytest.fixture(scope="module")
def interval_server(tmp_path_factory):
    """The demo model sending 4 tokens per message after the first (--stream-interval 4)."""
    d = tmp_path_factory.mktemp("grpc-interval")
    srv = ServerThread(["--no-store", "--data-dir", str(d / "data"), "--pool-mb", "16", "--max-model-len", "512",
                        "--stream-interval", "4"])
    yield srv
    srv.stop()


@pytest.mark.parametrize("server_name", ["demo_server", "interval_server"])
def test_stop_string_cuts_text(server_name, request):
    """The text ends before the stop string. The tokens end with the one that completed it, even
    where a message carried more (4 tokens a message), and usage counts just those."""
    demo_server = request.getfixturevalue(server_name)
    full = gen(demo_server.target, greq(prompt="abc", params=dict(max_new_tokens=30, ignore_eos=True)))
    text = "".join(m.text for m in full)
    stop = text[5:7]
    msgs = gen(demo_server.target, greq(prompt="abc", params=dict(max_new_tokens=30, ignore_eos=True, stop=[stop])))
    got = "".join(m.text for m in msgs)
    assert msgs[-1].finish_reason == pb.FINISH_REASON_STOP
    assert got == text[:text.index(stop)]
    from server.demo import build_tokenizer
    tok = build_tokenizer()
    full_ids = [t for m in full for t in m.token_ids]
    k = next(k for k in range(1, len(full_ids) + 1) if stop in tok.decode(full_ids[:k]))
    assert [t for m in msgs for t in m.token_ids] == full_ids[:k]
    assert msgs[-1].usage.completion_tokens == k


def test_200_concurrent_streams(demo_server):
    names = ["", "a", "b"]

    async def one(stub, i):
        n, fin = 0, None
        req = greq(prompt_token_ids=pb.TokenIds(ids=[i % 90, 5, 7, (3 * i) % 90]), adapter_id=names[i % 3],
                   params=dict(max_new_tokens=8 + i % 9, ignore_eos=True))
        async for m in stub.Generate(req, timeout=120):
            n += len(m.token_ids)
            fin = m
        return n, fin

    async def go():
        async with grpc.aio.insecure_channel(demo_server.target) as ch:
            stub = pb_grpc.InferenceStub(ch)
            return await asyncio.gather(*[one(stub, i) for i in range(200)])

    results = asyncio.run(go())
    for i, (n, fin) in enumerate(results):
        assert n == 8 + i % 9 and fin.finished and fin.usage.completion_tokens == n
    assert wait_for(lambda: demo_server.engine.pool.kv_pages == 0)


@pytest.mark.parametrize("req,code,words", [
    (greq(), "INVALID_ARGUMENT", "empty"),
    (greq(prompt="x", adapter_id="nope"), "NOT_FOUND", "not registered"),
    (greq(prompt="x", adapter_id="../etc"), "INVALID_ARGUMENT", "adapter_id"),
    (greq(prompt="x", params=dict(temperature=-1)), "INVALID_ARGUMENT", "temperature"),
    (greq(prompt="x", params=dict(temperature=float("nan"))), "INVALID_ARGUMENT", "temperature"),
    (greq(prompt="x", params=dict(top_p=1.5)), "INVALID_ARGUMENT", "top_p"),
    (greq(prompt="x", params=dict(top_k=-3)), "INVALID_ARGUMENT", "top_k"),
    (greq(prompt="x", params=dict(max_new_tokens=100000)), "INVALID_ARGUMENT", "max_new_tokens"),
    (greq(prompt="x" * 600), "INVALID_ARGUMENT", "prompt"),
    (greq(prompt_token_ids=pb.TokenIds(ids=[1, 100000])), "INVALID_ARGUMENT", "vocabulary"),
    (greq(prompt="x", params=dict(stop=[""])), "INVALID_ARGUMENT", "stop"),
])
def test_bad_input_gets_clear_status(demo_server, req, code, words):
    with pytest.raises(grpc.aio.AioRpcError) as e:
        gen(demo_server.target, req)
    assert e.value.code() == getattr(grpc.StatusCode, code)
    assert words in e.value.details()
    # and the server keeps serving
    assert gen(demo_server.target, greq(prompt="ok", params=dict(max_new_tokens=2)))[-1].finished


def test_client_cancel_and_deadline_free_pages(demo_server):
    eng = demo_server.engine

    async def cancel_after(n):
        async with grpc.aio.insecure_channel(demo_server.target) as ch:
            call = pb_grpc.InferenceStub(ch).Generate(
                greq(prompt="go", adapter_id="b", params=dict(max_new_tokens=480, ignore_eos=True)))
            got = 0
            async for m in call:
                got += len(m.token_ids)
                if got >= n:
                    call.cancel()
                    break
            return got

    assert asyncio.run(cancel_after(3)) >= 3
    assert wait_for(lambda: eng.pool.kv_pages == 0 and not eng.scheduler.running, timeout=5)

    with pytest.raises(grpc.aio.AioRpcError) as e:
        gen(demo_server.target, greq(prompt="go", params=dict(max_new_tokens=480, ignore_eos=True)), timeout=0.3)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: eng.pool.kv_pages == 0 and not eng.scheduler.running, timeout=5)


def test_a_second_stream_with_a_live_request_id_is_refused_and_the_first_runs_on(demo_server):
    """request_id is the client's to choose: a duplicate of a running one gets ALREADY_EXISTS,
    and its stream ending (the servicer aborts by id) must not end the first."""
    async def go():
        async with grpc.aio.insecure_channel(demo_server.target) as ch:
            stub = pb_grpc.InferenceStub(ch)
            first = stub.Generate(greq(request_id="same", prompt="go", adapter_id="a",
                                       params=dict(max_new_tokens=60, ignore_eos=True)))
            it = first.__aiter__()
            got = len((await it.__anext__()).token_ids)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in stub.Generate(greq(request_id="same", prompt="x", params=dict(max_new_tokens=5))):
                    pass
            async for m in it:
                got += len(m.token_ids)
                last = m
            return e.value, got, last

    err, got, last = asyncio.run(go())
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and "request_id 'same'" in err.details()
    assert got == 60 and last.finish_reason == pb.FINISH_REASON_LENGTH


def test_store_calls_on_a_server_without_a_store_say_so(demo_server):
    from clients.client import Client, LoraServeError
    with Client(demo_server.target) as c, pytest.raises(LoraServeError) as e:
        list(c.list_adapters())
    assert e.value.code == grpc.StatusCode.UNIMPLEMENTED and "--no-store" in e.value.details


def test_admin_stats_load_unload(demo_server):
    async def go():
        async with grpc.aio.insecure_channel(demo_server.target) as ch:
            admin = pb_grpc.EngineAdminStub(ch)
            loaded = await admin.LoadAdapter(pb.LoadAdapterRequest(adapter_id="b"))
            s1 = await admin.GetStats(pb.GetStatsRequest())
            un = await admin.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id="b"))
            s2 = await admin.GetStats(pb.GetStatsRequest())
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await admin.LoadAdapter(pb.LoadAdapterRequest(adapter_id="missing"))
            # keep_host: out of the GPU pool, still in host memory
            await admin.LoadAdapter(pb.LoadAdapterRequest(adapter_id="b"))
            kept = await admin.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id="b", keep_host=True))
            s3 = await admin.GetStats(pb.GetStatsRequest())
            again = await admin.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id="b", keep_host=True))
            return loaded, s1, un, s2, e.value.code(), (kept, s3, again)
    loaded, s1, un, s2, code, (kept, s3, again) = asyncio.run(go())
    assert kept.unloaded and "b" not in s3.resident_adapters and "b" in s3.cached_adapters
    assert not again.unloaded       # nothing left in the pool to unload
    assert loaded.loaded and loaded.pages > 0
    assert "b" in s1.resident_adapters and s1.pool.adapter_pages >= loaded.pages
    assert s1.pool.total_pages == s1.pool.free_pages + s1.pool.kv_pages + s1.pool.adapter_pages
    assert un.unloaded and "b" not in s2.resident_adapters
    assert s2.pool.adapter_pages == s1.pool.adapter_pages - loaded.pages
    assert code == grpc.StatusCode.NOT_FOUND


def test_health_and_reflection(demo_server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    with grpc.insecure_channel(demo_server.target) as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="loraserve.v1.Inference"))
        assert r.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
        resp = next(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in resp.list_services_response.service}
        assert {"loraserve.v1.Inference", "loraserve.v1.EngineAdmin", "grpc.health.v1.Health"} <= names


def test_text_prompt_without_tokenizer(tmp_path):
    model_dir = make_model(tmp_path / "m")
    srv = ServerThread(["--no-store", "--model", str(model_dir), "--data-dir", str(tmp_path / "d"), "--pool-mb", "2"])
    try:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            gen(srv.target, greq(prompt="hi"))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt_token_ids" in e.value.details()
        msgs = gen(srv.target, greq(prompt_token_ids=pb.TokenIds(ids=[3, 4, 5]), params=dict(max_new_tokens=4)))
        assert msgs[-1].finished and all(m.text == "" for m in msgs)
    finally:
        srv.stop()


def test_load_adapter_host_only_warms_the_cache(demo_server):
    from clients.client import Client
    eng = demo_server.engine

    def call(fn):
        return eng.call(fn).result(timeout=10)
    call(lambda: eng.adapters.unload("a"))            # cold again: neither cached nor resident
    with Client(demo_server.target) as c:
        r = c.load_adapter("a", host_only=True)
    assert r.loaded and r.pages == 0
    assert "a" in eng.adapters.cached_ids() and "a" not in call(lambda: list(eng.adapters.resident))
