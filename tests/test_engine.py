"""The engine against transformers + peft on the same weights: mixed batches of adapters of
different ranks and target modules plus base-model requests, preemption, cancellation."""
import json
import random

import pytest
import torch

from server.lora import load_peft_dir
from server.request import Finish, Request
from server.runtime import EngineConfig, build_engine
from server.sampler import SamplingParams
from server.scheduler import SchedulerConfig, Step
from tests.helpers import ADAPTER_SPECS, hf_reference, make_adapter, make_model, run_engine, wait_for

N_NEW = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    model_dir = make_model(d / "model")
    cfg = json.loads((model_dir / "config.json").read_text())
    adapters = {name: make_adapter(d / name, cfg, r, a, t, seed=i)
                for i, (name, (r, a, t)) in enumerate(ADAPTER_SPECS.items())}
    return model_dir, adapters


def start_engine(model_dir, adapters, **kw):
    sched = SchedulerConfig(**{k: kw.pop(k) for k in list(kw) if k in SchedulerConfig.__dataclass_fields__})
    engine, _ = build_engine(EngineConfig(str(model_dir), dtype="float32", sched=sched, **kw))
    for name, path in adapters.items():
        engine.adapters.add_weights(load_peft_dir(name, path, engine.cfg))
    engine.start()
    return engine


def greedy(n=N_NEW, **kw):
    return SamplingParams(max_new_tokens=n, ignore_eos=True, logprobs=True, **kw)


def mixed_requests(names, seed=0, lo=2, hi=40):
    rng = random.Random(seed)
    return [Request(f"r{i}", [rng.randrange(3, 97) for _ in range(rng.randrange(lo, hi))], greedy(), name)
            for i, name in enumerate(names)]


@pytest.mark.parametrize("order", ["rank", "arrival", "grouped"])
def test_mixed_batch_matches_transformers_peft(tiny, order, monkeypatch):
    """Decode rows in descending adapter rank (the default), in arrival order, or sorted by
    adapter (the grouped LoRA schedule's order): the same outputs."""
    import server.engine
    if order == "grouped":
        monkeypatch.setattr(server.engine, "GROUP_MIN_TOKENS", 1)
    monkeypatch.setattr(server.engine, "DECODE_ORDER", "arrival" if order == "arrival" else "rank")
    model_dir, adapters = tiny
    engine = start_engine(model_dir, adapters, pool_mb=4)
    free0 = engine.pool.free_pages
    ranks = []      # each launched step's decode rows, as their adapters' ranks (-1: base)
    launch = engine._launch

    def recording_launch(step):
        out = launch(step)      # the rows as launched: after the sort
        ranks.append([engine.table.max_rank[r.slot] if r.slot >= 0 else -1 for r in step.decodes])
        return out

    monkeypatch.setattr(engine, "_launch", recording_launch)
    names = ["attn", "", "full", "qv", "wide", "attn", "", "full", "qv", "wide"]
    reqs = mixed_requests(names)
    try:
        outs = run_engine(engine, reqs)
    finally:
        engine.stop()
    mixed = [rows for rows in ranks if len(set(rows)) > 2]
    assert mixed, "no step mixed ranks"
    if order == "rank":
        assert all(rows == sorted(rows, reverse=True) for rows in ranks), ranks
    elif order == "arrival":
        assert any(rows != sorted(rows, reverse=True) for rows in mixed)
    for req in reqs:
        toks, lps, last = outs[req.request_id]
        ref_t, ref_lp = hf_reference(model_dir, adapters.get(req.adapter_id), req.prompt_ids, N_NEW)
        assert toks == ref_t, f"{req.adapter_id or 'base'}: tokens differ"
        assert max(abs(a - b) for a, b in zip(lps, ref_lp)) < 1e-2
        assert last.finish == Finish.LENGTH
    # the adapters really change the output: the same prompt differs from the base model
    base_t, base_lp = hf_reference(model_dir, None, reqs[0].prompt_ids, N_NEW)
    assert outs["r0"][1] != pytest.approx(base_lp, abs=1e-3)
    # KV pages all came back; adapters stay resident (idle, evictable) until their pages are needed
    assert engine.pool.kv_pages == 0
    assert engine.pool.free_pages + engine.pool.adapter_pages == free0 == engine.pool.num_pages


def run_quantized(tiny, adapter_dtype, grouped, monkeypatch, seed):
    """(engine, requests, outputs) of a mixed batch over every adapter and the base model on an
    engine (stopped again) whose pool stores adapter rows as adapter_dtype; grouped: the grouped
    decode schedule from one token a group up."""
    if grouped:
        import server.engine
        monkeypatch.setattr(server.engine, "GROUP_MIN_TOKENS", 1)
    engine = start_engine(*tiny, pool_mb=4, adapter_dtype=adapter_dtype)
    reqs = mixed_requests(["attn", "", "full", "qv", "wide"] * 2, seed=seed)
    try:
        outs = run_engine(engine, reqs)
    finally:
        engine.stop()
    return engine, reqs, outs


@pytest.mark.parametrize("grouped", [False, True])
def test_int8_adapter_rows_match_transformers_peft_within_their_error(tiny, grouped, monkeypatch):
    """--adapter-dtype int8: the pool holds each adapter row as int8 with a scale. Against
    transformers + peft on the full-precision weights: the same greedy tokens for every adapter
    in the mixed batch, log-probabilities within a bound looser than the fp32 engine's (1e-2)."""
    model_dir, adapters = tiny
    engine, reqs, outs = run_quantized(tiny, "int8", grouped, monkeypatch, seed=1)
    assert engine.pool.quantized and engine.table.flat.dtype == torch.int8
    worst = 0.0
    for req in reqs:
        toks, lps, _ = outs[req.request_id]
        ref_t, ref_lp = hf_reference(model_dir, adapters.get(req.adapter_id), req.prompt_ids, N_NEW)
        assert toks == ref_t, f"{req.adapter_id or 'base'}: tokens differ"
        err = max(abs(a - b) for a, b in zip(lps, ref_lp))
        if req.adapter_id:
            worst = max(worst, err)
        else:       # base requests do not touch adapter rows: exact as before
            assert err < 1e-3
    assert worst < 3e-2, worst


def int4_round_trip_adapter(src, dst):
    """A PEFT folder holding ``src``'s weights as the pool's int4 rows hold them: every row of A
    and of B^T quantized (server.pool.quantize_rows_int4) and dequantized."""
    import shutil

    from safetensors.torch import load_file, save_file

    from server.pool import quantize_rows_int4, unpack_int4

    def stored(m):
        packed, scale = quantize_rows_int4(m)
        return unpack_int4(packed, m.shape[1]).float() * scale[:, None]

    tensors = load_file(str(src / "adapter_model.safetensors"))
    out = {k: stored(t) if ".lora_A." in k else stored(t.t()).t().contiguous() for k, t in tensors.items()}
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "adapter_config.json", dst / "adapter_config.json")
    save_file(out, str(dst / "adapter_model.safetensors"))
    return dst


@pytest.mark.parametrize("grouped", [False, True])
def test_int4_adapter_rows_match_transformers_peft_on_their_int4_weights(tiny, grouped, monkeypatch, tmp_path):
    """--adapter-dtype int4: two weights a byte, a scale per row. The engine computes exactly the
    model whose adapters are those int4 rows: against transformers + peft on the int4-rounded
    weights, the same greedy tokens for every adapter in the mixed batch and log-probabilities
    within the fp32 engine's bound. Against the full-precision adapters the outputs move by the
    quantization error: each token stays within 1 nat of the full-precision model's best at its
    position (teacher-forced; these strong random adapters leave the full-precision greedy path
    at near-ties, seen 0.66 at most), and base requests are untouched."""
    from tests.helpers import hf_scores
    model_dir, adapters = tiny
    engine, reqs, outs = run_quantized(tiny, "int4", grouped, monkeypatch, seed=2)
    assert engine.pool.int4 and engine.table.flat.dtype == torch.uint8 and engine.pool.stats().adapter_dtype == "int4"
    rounded = {n: int4_round_trip_adapter(p, tmp_path / n) for n, p in adapters.items()}
    moved = 0.0
    for req in reqs:
        toks, lps, _ = outs[req.request_id]
        ref_t, ref_lp = hf_reference(model_dir, rounded.get(req.adapter_id), req.prompt_ids, N_NEW)
        assert toks == ref_t, f"{req.adapter_id or 'base'}: tokens differ from the int4 model's"
        assert max(abs(a - b) for a, b in zip(lps, ref_lp)) < 1e-2
        scores = hf_scores(model_dir, adapters.get(req.adapter_id), req.prompt_ids, toks)
        gap = max(best - lp for lp, best in scores)
        if req.adapter_id:
            moved = max(moved, max(abs(a - lp) for a, (lp, _) in zip(lps, scores)))
            assert gap < 1.0, (req.adapter_id, gap)
        else:
            assert gap == 0.0
    assert moved > 1e-3      # the rows really are 4-bit: the full-precision model scores them differently


def test_lora_groups_and_attention_only_batches(tiny):
    """q/k/v (and gate/up) run as one LoRA launch each; a batch whose adapters all target
    attention only skips the MLP launches. Outputs still match transformers+peft."""
    model_dir, adapters = tiny
    engine = start_engine(model_dir, adapters, pool_mb=4)
    ops, calls = engine.model.ops, []
    apply = ops.lora_apply

    def spy(y, x, flat, rows, meta, scaling, batch, widths=None, row_scale=None):
        calls.append((tuple(meta.shape[1:-1]), batch.mlp))
        return apply(y, x, flat, rows, meta, scaling, batch, widths, row_scale)

    ops.lora_apply = spy
    try:
        by_name = {}
        for names in (["attn", "qv", ""], ["attn", "full"]):
            calls.clear()
            reqs = mixed_requests(names, seed=3)
            outs = run_engine(engine, reqs)
            by_name[tuple(names)] = list(calls)
            for req in reqs:
                ref_t, ref_lp = hf_reference(model_dir, adapters.get(req.adapter_id), req.prompt_ids, N_NEW)
                assert outs[req.request_id][0] == ref_t, req.adapter_id
                assert max(abs(a - b) for a, b in zip(outs[req.request_id][1], ref_lp)) < 1e-2
    finally:
        engine.stop()
    L = engine.model.cfg.num_layers
    attn_only, with_full = by_name[("attn", "qv", "")], by_name[("attn", "full")]
    # attention-only steps: per layer one q/k/v launch (3 modules) and one o_proj launch
    assert attn_only and all(not mlp for _, mlp in attn_only)
    assert sorted(set(shape for shape, _ in attn_only)) == [(), (3,)]
    assert len(attn_only) % (2 * L) == 0
    # with an MLP adapter in the batch: gate/up together (2 modules) and down_proj as well
    assert all(mlp for _, mlp in with_full) and (2,) in {shape for shape, _ in with_full}
    assert len(with_full) % (4 * L) == 0
    # decode-step accounting: at most two distinct adapters per step in either batch, each
    # counted at its pool size
    st, sizes = engine.stats, {engine.table.nbytes[r.slot] for r in engine.adapters.resident.values()}
    assert st.decode_steps > 0 and st.decode_tokens >= st.decode_steps
    assert 0 < st.decode_adapters <= 2 * st.decode_steps
    assert min(sizes) * st.decode_adapters <= st.decode_adapter_bytes <= max(sizes) * st.decode_adapters
    assert "mean_distinct_adapters=" in st.summary(engine.model.weight_bytes)
    # the table's host flag behind the choice, for the adapters the two batches loaded
    flags = {name: bool(engine.table.mlp[engine.adapters.resident[name].slot]) for name in ("attn", "full", "qv")}
    assert flags == {"attn": False, "full": True, "qv": False}


@pytest.mark.parametrize("variant", ["llama3-rope", "qwen2-bias", "mistral-tied", "tied-with-lm-head",
                                     "qwen2-no-architectures", "mistral-window"])
def test_model_families_match_transformers(tmp_path, variant):
    over = {
        "llama3-rope": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                            rope_theta=500000.0, num_key_value_heads=1),
        "qwen2-bias": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", attention_bias=True),
        "mistral-tied": dict(architectures=["MistralForCausalLM"], model_type="mistral",
                             tie_word_embeddings=True, sliding_window=None),
        # tied, yet the checkpoint stores an lm_head too: transformers uses the embeddings
        "tied-with-lm-head": dict(tie_word_embeddings=True),
        # no "architectures": transformers goes by model_type
        "qwen2-no-architectures": dict(architectures=None, model_type="qwen2", attention_bias=True),
        # a window longer than any sequence served: max_model_len is capped at it
        "mistral-window": dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=64),
    }[variant]
    model_dir = make_model(tmp_path / "m", seed=3, **over)
    cfg = json.loads((model_dir / "config.json").read_text())
    from safetensors.torch import load_file, save_file
    sd = load_file(str(model_dir / "model.safetensors"))
    if variant == "mistral-tied":   # a tied checkpoint carries no lm_head tensor
        sd.pop("lm_head.weight", None)
    if variant == "tied-with-lm-head":
        sd["lm_head.weight"] = torch.randn_like(sd["model.embed_tokens.weight"])
    save_file(sd, str(model_dir / "model.safetensors"))
    if variant == "qwen2-no-architectures":
        del cfg["architectures"]
        (model_dir / "config.json").write_text(json.dumps(cfg))
    ad = {"a": make_adapter(tmp_path / "a", cfg, 8, 16, ["q_proj", "v_proj", "down_proj"], seed=5)}
    engine = start_engine(model_dir, ad, pool_mb=4)
    window = variant == "mistral-window"
    reqs = mixed_requests(["a", ""], seed=1, lo=5 if window else 20, hi=40 if window else 80)
    try:
        if window:
            assert engine.max_model_len == 64
        outs = run_engine(engine, reqs)
    finally:
        engine.stop()
    for req in reqs:
        ref_t, ref_lp = hf_reference(model_dir, ad.get(req.adapter_id), req.prompt_ids, N_NEW)
        assert outs[req.request_id][0] == ref_t
        assert max(abs(a - b) for a, b in zip(outs[req.request_id][1], ref_lp)) < 1e-2


def test_sharded_checkpoint_loads(tiny, tmp_path):
    from safetensors.torch import load_file, save_file
    model_dir, _ = tiny
    sd = load_file(str(model_dir / "model.safetensors"))
    keys = sorted(sd)
    out = tmp_path / "sharded"
    out.mkdir()
    (out / "config.json").write_text((model_dir / "config.json").read_text())
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for fname, ks in halves.items():
        save_file({k: sd[k] for k in ks}, str(out / fname))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, ks in halves.items() for k in ks}}))
    engine = start_engine(out, {}, pool_mb=2)
    req = mixed_requests([""], seed=7)[0]
    try:
        toks = run_engine(engine, [req])[req.request_id][0]
    finally:
        engine.stop()
    assert toks == hf_reference(model_dir, None, req.prompt_ids, N_NEW)[0]


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_preemption_recomputes_and_matches(tiny, sampling):
    """Optimistic admission over-commits a small pool; preempted requests are recomputed and
    still produce exactly the tokens of an uncontended run, and every page comes back. Seeded
    sampling too: the token a preempted request had in flight is voided without shifting the
    draws of the tokens after it."""
    model_dir, adapters = tiny
    names = ["attn", "full", "qv", "", "attn", "full"]
    n_new = 40
    params = (lambda i: greedy(n_new)) if sampling == "greedy" else (lambda i: greedy(n_new, temperature=1.0, seed=100 + i))
    reqs = [Request(r.request_id, r.prompt_ids, params(i), r.adapter_id)
            for i, r in enumerate(mixed_requests(names, seed=2, lo=20, hi=30))]
    # reference: plenty of room
    engine = start_engine(model_dir, adapters, pool_mb=4)
    try:
        ref = run_engine(engine, [Request(r.request_id, r.prompt_ids, r.params, r.adapter_id) for r in reqs])
    finally:
        engine.stop()
    # 2 layers x (K, V) = 4 pages per 16-token block. The three adapters take 78 pages; 24 more
    # hold 6 blocks: the six ~65-token requests need 5 blocks each at their peak, so optimistic
    # admission lets several in and the pool runs out as they grow.
    engine = start_engine(model_dir, adapters, pool_pages=78 + 24 + 1, admission="optimistic")
    small = engine.pool
    free0 = small.num_pages
    try:
        outs = run_engine(engine, reqs)
    finally:
        engine.stop()
    assert engine.scheduler.preemptions > 0 and any(r.preempted for r in reqs)
    for r in reqs:
        assert outs[r.request_id][0] == ref[r.request_id][0], (r.adapter_id, r.preempted)
    assert small.kv_pages == 0
    assert small.free_pages + small.adapter_pages == free0
    assert small.adapter_pages <= 78


def test_cancel_frees_pages_within_a_step(tiny):
    model_dir, adapters = tiny
    engine = start_engine(model_dir, adapters, pool_mb=2)
    got = []
    req = Request("long", [5, 6, 7, 8], SamplingParams(max_new_tokens=400, ignore_eos=True), "full", emit=got.append)
    engine.submit(req)
    try:
        assert wait_for(lambda: len(got) >= 3)
        assert engine.pool.kv_pages > 0
        engine.abort("long")
        assert wait_for(lambda: got[-1].finish is not None)    # (req.finished comes before the flush)
        assert wait_for(lambda: engine.pool.kv_pages == 0, timeout=2)
        assert req.finished and got[-1].finish == Finish.ABORTED
        assert len(got) < 400
        # the adapter is still resident (idle, evictable) and its pages are accounted for
        assert engine.pool.free_pages + engine.pool.adapter_pages == engine.pool.num_pages
    finally:
        engine.stop()


def test_a_duplicate_request_id_is_refused_and_aborts_only_its_owner(tiny):
    """A second live request with the same id gets ALREADY_EXISTS; the stream of that refused
    request ending (its servicer aborts by id) leaves the first one running."""
    model_dir, adapters = tiny
    engine = start_engine(model_dir, adapters, pool_mb=2)
    first, second = [], []
    a = Request("dup", [5, 6, 7], SamplingParams(max_new_tokens=300, ignore_eos=True), "attn", emit=first.append)
    b = Request("dup", [8, 9], SamplingParams(max_new_tokens=5, ignore_eos=True), "", emit=second.append)
    try:
        engine.submit(a)
        assert wait_for(lambda: len(first) >= 2)
        engine.submit(b)
        assert wait_for(lambda: bool(second))
        assert second[-1].error[0] == "ALREADY_EXISTS" and "request_id 'dup'" in second[-1].error[1]
        engine.abort("dup", b)        # what b's servicer does when its stream ends
        n = len(first)
        assert wait_for(lambda: len(first) >= n + 3) and not a.finished
        engine.abort("dup", a)
        assert wait_for(lambda: first[-1].finish == Finish.ABORTED)
        # the id is free again once its request ended
        c = Request("dup", [8, 9], SamplingParams(max_new_tokens=4, ignore_eos=True), "")
        assert run_engine(engine, [c])["dup"][2].finish == Finish.LENGTH
    finally:
        engine.stop()


def test_sampling_seed_topk_and_eos(tiny):
    model_dir, adapters = tiny
    engine = start_engine(model_dir, adapters, pool_mb=2)
    prompt = [4, 9, 13, 22, 31]
    p = lambda **kw: SamplingParams(max_new_tokens=16, ignore_eos=True, **kw)  # noqa: E731
    try:
        reqs = [Request("s1", prompt, p(temperature=1.0, seed=7), "attn"),
                Request("s2", prompt, p(temperature=1.0, seed=7), "attn"),
                Request("s3", prompt, p(temperature=1.0, seed=8), "attn"),
                Request("k1", prompt, p(temperature=0.7, top_k=1, seed=1), "attn"),
                Request("g", prompt, p(), "attn"),
                Request("tp", prompt, p(temperature=1.0, top_p=1e-6, seed=3), "attn"),
                # logits / 1e-39 overflow to inf: greedy, not a NaN that fails the whole step
                Request("t0", prompt, p(temperature=1e-39), "attn")]
        outs = run_engine(engine, reqs)
        assert outs["s1"][0] == outs["s2"][0]
        assert outs["s1"][0] != outs["s3"][0]
        assert outs["k1"][0] == outs["g"][0] == outs["tp"][0] == outs["t0"][0]
        # EOS: force the EOS id to be the greedy first token of this prompt
        first = outs["g"][0][0]
        engine.eos = {first}
        out = run_engine(engine, [Request("e", prompt, SamplingParams(max_new_tokens=16), "attn")])["e"]
        assert out[0] == [first] and out[2].finish == Finish.EOS
        out = run_engine(engine, [Request("i", prompt, SamplingParams(max_new_tokens=5, ignore_eos=True), "attn")])["i"]
        assert len(out[0]) == 5 and out[2].finish == Finish.LENGTH
    finally:
        engine.stop()


@pytest.mark.parametrize("adapter_dtype", ["auto", "int8", "int4"])
def test_adapter_table_compaction_keeps_every_adapter_addressable(tiny, adapter_dtype):
    """Insert several adapters, remove ones from the middle, insert again: every remaining adapter's
    rows (through the row table and index, and int8/int4 rows' scales) still hold exactly its weights
    (int8, int4: exactly their quantized form)."""
    from server.pool import AdapterTable, UnifiedPool, quantize_rows, quantize_rows_int4, stage_adapter, unpack_int4

    model_dir, adapters = tiny
    engine, _ = build_engine(EngineConfig(str(model_dir), dtype="float32", pool_mb=2, adapter_dtype=adapter_dtype))
    pool = engine.pool
    table = AdapterTable(pool, 8)

    def stored(m):     # what the pool holds of a matrix
        if adapter_dtype == "auto":
            return m
        if adapter_dtype == "int4":
            packed, scale = quantize_rows_int4(m)
            return unpack_int4(packed, m.shape[1]).float() * scale[:, None]
        q, scale = quantize_rows(m)
        return q.float() * scale[:, None]

    loaded = {n: load_peft_dir(n, p, engine.cfg) for n, p in adapters.items()}
    slots = {n: table.insert(stage_adapter(w, pool)).slot for n, w in loaded.items()}
    table.remove(slots.pop("attn"))
    table.remove(slots.pop("qv"))
    slots["qv"] = table.insert(stage_adapter(loaded["qv"], pool)).slot
    check_table_holds(table, {slots[n]: loaded[n] for n in slots}, stored)
    # a fragmented pool: the next adapter's pages come in no order, runs and single pages mixed
    name = "full" if adapter_dtype == "int4" else "attn"     # (int4's attn rows fill too few pages to mix)
    if name == "full":
        table.remove(slots.pop("full"))
    free = sorted(pool.alloc(pool.free_pages, "kv"))
    runs = [free[i:i + 3] for i in range(0, len(free), 3)]     # runs of 3 consecutive ids, shuffled
    random.Random(3).shuffle(runs)
    pool.free([pg for run in runs for pg in run], "kv")
    slots[name] = table.insert(stage_adapter(loaded[name], pool)).slot
    got = table.slots[slots[name]].pages
    assert any(b != a + 1 for a, b in zip(got, got[1:])) and any(b == a + 1 for a, b in zip(got, got[1:]))
    check_table_holds(table, {slots[n]: loaded[n] for n in slots}, stored)
    assert table.num_rows == sum(e.num_rows for e in table.slots.values())
    engine.adapters.close()


def check_table_holds(table, by_slot: dict, stored=lambda m: m) -> None:
    """Every slot's A and B^T rows, read through the row table and index (int8: with their
    scales), equal ``stored`` of its adapter's weights."""
    from kernels.reference import gather_rows
    from server.config import TARGET_MODULES

    for slot, weights in by_slot.items():
        for (layer, module), (a, b) in weights.weights.items():
            a0, b0, ra, rb = (int(z) for z in table.meta[slot, layer, TARGET_MODULES.index(module)])
            assert torch.equal(gather_rows(table.flat, table.rows, a0, ra, a.shape[1], table.row_scale).cpu(),
                               stored(a))
            assert torch.equal(gather_rows(table.flat, table.rows, b0, rb, b.shape[0], table.row_scale).cpu(),
                               stored(b.t()))


def test_warmup_runs_every_rank_and_leaves_nothing_behind(tiny):
    """The start-up warm-up (compiles eager-step kernels on CUDA) runs prefill and mixed steps with
    a temporary adapter per rank, and hands back every page, slot and block-table row."""
    model_dir, adapters = tiny
    engine, _ = build_engine(EngineConfig(str(model_dir), dtype="float32", pool_mb=8))
    pool, table = engine.pool, engine.table
    free0, slots0 = pool.free_pages, len(table._free_slots)
    ranks_seen = []
    run = engine._run

    def spy(step):
        ranks_seen.append(max((table.max_rank[r.slot] for r in step.prefills + step.decodes if r.slot >= 0), default=0))
        return run(step)

    engine._run = spy
    # the default prompts include 600 tokens: more than this model's max_model_len, so clipped
    assert engine.max_model_len < 600
    from server.warmup import warm_up
    warm_up(engine, ranks=(8, 64))
    assert sorted(set(ranks_seen)) == [0, 8, 64] and len(ranks_seen) == 3 * 4 * 2
    assert pool.free_pages == free0 and pool.adapter_pages == 0 and pool.kv_pages == 0
    assert len(table._free_slots) == slots0 and table.num_rows == 0 and not table.slots
    assert engine.stats.steps == 0 and not engine.scheduler.running
    engine.adapters.close()


def test_preload_keeps_its_margin_and_never_evicts(tiny):
    model_dir, adapters = tiny
    engine, _ = build_engine(EngineConfig(str(model_dir), dtype="float32", pool_mb=4))
    mgr, pool = engine.adapters, engine.pool
    for name, path in adapters.items():
        mgr.add_weights(load_peft_dir(name, path, engine.cfg))
    free = pool.free_pages
    assert mgr.preload("full", free) == 0 and "full" not in mgr.resident    # the margin stays free
    took = mgr.preload("full", 0)
    assert took > 0 and pool.free_pages == free - took and mgr.resident["full"].refs == 0
    assert mgr.preload("full", 0) == 0                                              # already resident
    # filling the pool with preloads never evicts one adapter for another
    got = {a: mgr.preload(a, 0) for a in ("attn", "qv", "wide")}
    assert set(mgr.resident) == {"full"} | {a for a, n in got.items() if n}
    assert pool.free_pages == free - took - sum(got.values()) >= 0
    assert mgr.evictions == 0
    # room for pages the pool lacks: idle adapters go, least recently used first, each counted
    before = list(mgr.resident)
    mgr.make_room(pool.free_pages + 1)
    gone = [a for a in before if a not in mgr.resident]
    assert gone == before[:len(gone)] and mgr.evictions == len(gone) >= 1
    engine.adapters.close()


def test_prefill_interval_batches_admissions_and_keeps_outputs(tiny):
    """prefill_interval=3: while a request decodes, newcomers wait up to 3 steps and are admitted
    together; a full prefill budget waiting is admitted at once; tokens match the reference."""
    model_dir, adapters = tiny
    engine, _ = build_engine(EngineConfig(str(model_dir), dtype="float32", pool_mb=8,
                                          sched=SchedulerConfig(prefill_interval=3, max_prefill_tokens=64)))
    for name, path in adapters.items():
        engine.adapters.add_weights(load_peft_dir(name, path, engine.cfg))
    sch = engine.scheduler
    reqs = mixed_requests(["attn", "qv", "", "full"], seed=3, lo=5, hi=12)

    def step():
        s = sch.schedule()
        if not s.empty:
            engine._run(s)
        return [r.request_id for r in s.prefills]

    mgr = engine.adapters
    sch.add(reqs[0])
    assert step() == ["r0"]                         # idle engine: admitted at once
    sch.add(reqs[1])
    assert step() == []                             # 1 step since the last admission
    # while r1 waits, its adapter is copied into free pages (idle: evictable, no reference)
    assert mgr.preloads == 1 and mgr.resident["qv"].refs == 0
    sch.add(reqs[2])
    assert step() == []                             # 2
    loads = mgr.loads
    assert step() == ["r1", "r2"]                   # 3: both newcomers in one prefill step
    assert mgr.loads == loads and mgr.resident["qv"].refs == 1   # admitted without another copy
    big = Request("big", list(range(3, 63)), greedy(4), "")   # with r3, >= the 64-token budget
    sch.add(reqs[3])
    sch.add(big)
    assert step() == ["r3"]                         # a full budget waits: no wait; r3 fits first
    while sch.has_work:
        step()
    # a prompt longer than the whole prefill budget is not stuck: it runs alone in its step
    long = Request("long", list(range(3, 83)), greedy(2), "qv")
    sch.add(long)
    assert step() == ["long"]
    while sch.has_work:
        step()
    assert len(long.output_ids) == 2
    for r in reqs:
        ref_t, _ = hf_reference(model_dir, adapters.get(r.adapter_id), r.prompt_ids, N_NEW)
        assert r.output_ids == ref_t, r.adapter_id
    assert len(big.output_ids) == 4
    engine.adapters.close()


@pytest.mark.parametrize("limit", ["pages", "max_num_seqs"])
def test_a_full_engine_waits_out_the_prefill_interval(tiny, limit):
    """At saturation room frees up one finishing request at a time. A full prefill budget waiting
    must not then admit each newcomer in its own (eager, costly) step: once an admission stopped
    for want of pages (or at max_num_seqs), the next one waits for the interval."""
    model_dir, adapters = tiny
    # 2 layers x (K, V): a 16-token block is 4 pages; 8 pages hold two requests at their peak
    sched = SchedulerConfig(prefill_interval=4, max_prefill_tokens=16, max_num_seqs=2 if limit == "max_num_seqs" else 256)
    engine, _ = build_engine(EngineConfig(str(model_dir), dtype="float32", sched=sched,
                                          pool_pages=8 + 1 if limit == "pages" else 0))
    sch = engine.scheduler

    def step():
        s = sch.schedule()
        if not s.empty:
            engine._run(s)
        return [r.request_id for r in s.prefills]

    short = Request("short", [5, 6, 7, 8], greedy(2), "")
    long = Request("long", [9, 10, 11, 12], greedy(12), "")
    sch.add(short)
    sch.add(long)
    assert step() == ["short", "long"]          # idle engine: admitted at once; the pool is full
    newcomers = [Request(f"n{i}", list(range(20 + 10 * i, 30 + 10 * i)), greedy(6), "") for i in range(2)]
    for r in newcomers:
        sch.add(r)                              # 20 tokens waiting: a full 16-token budget
    assert step() == []                         # tried at once: no room; `short` finishes here
    assert short.finished and len(sch.running) == 1
    assert [step() for _ in range(3)] == [[], [], []]   # room for n0 now, but the interval runs
    assert step() == ["n0"]                     # 4 steps after the page-bound attempt
    while sch.has_work:
        step()
    assert [len(r.output_ids) for r in (long, *newcomers)] == [12, 6, 6]
    assert engine.pool.kv_pages == 0
    engine.adapters.close()


def test_outputs_reach_the_stream_while_the_next_step_runs(tiny):
    """A step's outputs are handed to the streams after the next step is launched (or when the
    engine goes idle), in order, each request's finish last."""
    model_dir, adapters = tiny
    engine, _ = build_engine(EngineConfig(str(model_dir), dtype="float32", pool_mb=8))
    got: dict[str, list] = {"a": [], "b": []}
    reqs = [Request(name, [5, 6, 7], greedy(n), "", emit=got[name].append) for name, n in (("a", 2), ("b", 3))]
    sch = engine.scheduler
    for r in reqs:
        sch.add(r)
    engine._run(sch.schedule())
    assert got == {"a": [], "b": []}                # nothing yet: step 1's tokens wait in the outbox
    engine._run(sch.schedule())
    assert [o.token_ids for o in got["a"]] == [[reqs[0].output_ids[0]]] and got["a"][0].finish is None
    engine._run(sch.schedule())                     # a finished in step 2: its last token arrives now
    assert [o.token_ids for o in got["a"]] == [[t] for t in reqs[0].output_ids]
    assert got["a"][-1].finish == Finish.LENGTH and len(got["b"]) == 2
    assert not sch.has_work
    engine._flush()                                 # what the loop does when it goes idle
    assert [o.token_ids for o in got["b"]] == [[t] for t in reqs[1].output_ids]
    assert [o.finish for o in got["b"]] == [None, None, Finish.LENGTH]
    engine.adapters.close()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_next_step_launches_before_the_previous_tokens_are_read(tiny, device):
    """The loop launches step N+1, then reads step N's tokens. Decodes of N+1 take their input
    token from N's output on the device; a request whose last token is in flight is not
    scheduled again; one that hits EOS, is aborted or preempted while a step is in flight gets
    nothing from it. Tokens match a step-at-a-time run."""
    model_dir, adapters = tiny
    engine, _ = build_engine(EngineConfig(str(model_dir), dtype="float32", device=device, pool_mb=8))
    for name, path in adapters.items():
        engine.adapters.add_weights(load_peft_dir(name, path, engine.cfg))
    sch = engine.scheduler
    make = lambda: [Request("a", [5, 6, 7], greedy(6), "attn"), Request("b", [9, 3], greedy(1), ""),  # noqa: E731
                    Request("c", [8, 8, 4, 2], greedy(6), "full"), Request("d", [3, 4], greedy(6), "qv")]
    ref = make()
    for r in ref:
        sch.add(r)
    while sch.has_work:
        engine._run(sch.schedule())
    engine._flush()
    assert [len(r.output_ids) for r in ref] == [6, 1, 6, 6]

    reqs = make()
    a, b, c, d = reqs
    got = {r.request_id: [] for r in reqs}
    for r in reqs:
        r.emit = got[r.request_id].append
        engine._handle(("add", r))
    engine.eos = {ref[2].output_ids[2]}      # c's third token ends it (c does not ignore EOS)
    c.params = SamplingParams(max_new_tokens=6, logprobs=True)

    def pipelined_step():      # what the loop does
        step = sch.schedule()
        engine._overlap(step)
        return step

    s1 = pipelined_step()
    assert len(s1.prefills) == 4 and all(r.inflight == 1 and not r.output_ids for r in reqs)
    s2 = pipelined_step()                    # launched before step 1's tokens were read
    assert b not in s2.decodes               # its only token was in flight
    assert [len(r.output_ids) for r in reqs] == [1, 1, 1, 1] and b.finished
    assert a.inflight == 1 and engine._inflight is not None
    engine.abort("d")
    engine._drain(block=False)               # d leaves while step 2 (holding d) is in flight
    assert d.finished and d.inflight == 0
    while sch.has_work or engine._inflight is not None:
        pipelined_step()
    engine._flush()                          # what the loop does when it goes idle
    assert a.output_ids == ref[0].output_ids and b.output_ids == ref[1].output_ids
    assert c.output_ids == ref[2].output_ids[:3] and got["c"][-1].finish == Finish.EOS
    assert d.output_ids == ref[3].output_ids[:1] and got["d"][-1].finish == Finish.ABORTED
    # each stream got each token once, the finish last
    assert [t for o in got["a"] for t in o.token_ids] == ref[0].output_ids
    assert [o.finish for o in got["c"]] == [None, None, Finish.EOS]
    assert engine.pool.kv_pages == 0 and all(r.inflight == 0 for r in reqs)
    # a preempted request's token in flight is void; it recomputes and ends with the same tokens
    e = Request("e", [5, 6, 7], greedy(6), "attn")
    sch.add(e)
    pipelined_step()
    pipelined_step()
    assert e.inflight == 1 and len(e.output_ids) == 1     # step 2 holds its second token
    assert sch._preempt() and e.inflight == 0
    while sch.has_work or engine._inflight is not None:
        pipelined_step()
    assert e.output_ids == ref[0].output_ids and e.preempted == 1
    engine.adapters.close()


def test_flush_wakes_each_event_loop_once(tiny):
    """Streams on one servicer event loop get a step's outputs through one thread-safe call (one
    wake-up per step, not per token), each on its own queue and in order; requests without a
    stream use emit; a closed loop (server stopping) does not break the flush."""
    import asyncio
    import threading

    from server.request import Output, StreamQueue
    model_dir, _ = tiny
    engine, _ = build_engine(EngineConfig(str(model_dir), dtype="float32", pool_mb=8))
    loops = [asyncio.new_event_loop() for _ in range(2)]
    for lp in loops:
        threading.Thread(target=lp.run_forever, daemon=True).start()
    wakeups = []
    for lp in loops:
        real = lp.call_soon_threadsafe
        lp.call_soon_threadsafe = lambda *a, lp=lp, real=real: (wakeups.append(lp), real(*a))[1]
    queues = [asyncio.Queue() for _ in range(3)]
    emitted = []
    reqs = [Request("a", [1], greedy(4), "", stream=StreamQueue(loops[0], queues[0])),
            Request("b", [1], greedy(4), "", stream=StreamQueue(loops[0], queues[1])),
            Request("c", [1], greedy(4), "", stream=StreamQueue(loops[1], queues[2])),
            Request("d", [1], greedy(4), "", emit=emitted.append)]
    outs = [Output([i], []) for i in range(6)]
    engine._outbox = [(reqs[0], outs[0]), (reqs[1], outs[1]), (reqs[0], outs[2]), (reqs[2], outs[3]),
                      (reqs[3], outs[4]), (reqs[1], outs[5])]
    engine._flush()
    assert sorted(map(id, wakeups)) == sorted(map(id, loops)) and len(wakeups) == 2

    def drain(q, lp):
        async def take():
            return [q.get_nowait() for _ in range(q.qsize())]
        return asyncio.run_coroutine_threadsafe(take(), lp).result(timeout=5)
    assert drain(queues[0], loops[0]) == [outs[0], outs[2]]
    assert drain(queues[1], loops[0]) == [outs[1], outs[5]]
    assert drain(queues[2], loops[1]) == [outs[3]]
    assert emitted == [outs[4]] and engine._outbox == []
    loops[1].call_soon_threadsafe(loops[1].stop)
    assert wait_for(lambda: not loops[1].is_running())
    loops[1].close()
    engine._outbox = [(reqs[2], Output([9], [])), (reqs[0], Output([7], []))]
    engine._flush()                                  # the closed loop's output is dropped
    assert [o.token_ids for o in drain(queues[0], loops[0])] == [[7]]
    loops[0].call_soon_threadsafe(loops[0].stop)
    engine.adapters.close()


def test_admission_checks_only_the_adapters_it_reaches(tiny):
    """A long queue over many adapters: a step looks up the readiness of the adapters of the
    requests it considers, not of every adapter waiting; everything still runs to the end."""
    model_dir, adapters = tiny
    engine, _ = build_engine(EngineConfig(str(model_dir), dtype="float32", pool_mb=8, sched=SchedulerConfig(max_num_seqs=2)))
    mgr = engine.adapters
    for name, path in adapters.items():
        mgr.add_weights(load_peft_dir(name, path, engine.cfg))
    names = [n for n in adapters][:3]
    reqs = mixed_requests([names[i % 3] for i in range(12)], seed=4, lo=3, hi=6)
    sch = engine.scheduler
    for r in reqs:
        sch.add(r)
    looked_up = []
    real = mgr.ready
    mgr.ready = lambda aid: (looked_up.append(aid), real(aid))[1]
    step = sch.schedule()
    assert [r.request_id for r in step.prefills] == ["r0", "r1"]
    assert looked_up == names[:2]
    assert [mgr.resident[n].refs for n in names[:2]] == [1, 1]
    engine._run(step)
    while sch.has_work:
        s = sch.schedule()
        if not s.empty:
            engine._run(s)
    assert all(r.finished for r in reqs) and engine.pool.kv_pages == 0
    mgr.close()


def test_fetch_process_stages_int8_rows_like_the_engine(tiny):
    """The fetch worker processes stage adapters for the pool's layout: with int8 rows they send
    the quantized page images and their row scales (in shared memory), the same bytes the engine
    would stage itself, and the engine's table accepts them."""
    from kernels.reference import gather_rows
    from server.adapters import LocalSource, fetch_and_stage
    from server.config import TARGET_MODULES
    from server.pool import stage_adapter
    from server.tp import TP

    model_dir, adapters = tiny
    engine, _ = build_engine(EngineConfig(str(model_dir), dtype="float32", pool_mb=2, adapter_dtype="int8"))
    pool = engine.pool
    version, staged = fetch_and_stage("full", LocalSource(adapters), engine.adapters.model_cfg, TP(),
                                      pool.block_tokens, pool.dtype, pool.adapter_dtype)
    weights = load_peft_dir("full", adapters["full"], engine.cfg)
    here = stage_adapter(weights, pool)
    assert staged.images.dtype == torch.int8 and staged.images.is_shared() and staged.row_scale.is_shared()
    assert torch.equal(staged.rel_offsets, here.rel_offsets) and torch.equal(staged.row_scale, here.row_scale)
    assert staged.nbytes < here.images.numel() * 4 / 3     # a quarter of fp32's bytes, plus the scales
    # every row the kernels read holds the same bytes (page tails are never written nor read)
    table = engine.table
    ours, theirs = table.insert(staged), table.insert(here)
    assert table.row_scale[ours.row_start:ours.row_start + ours.num_rows].cpu().equal(staged.row_scale)
    for (layer, module), (a, b) in weights.weights.items():
        m = TARGET_MODULES.index(module)
        for col, width in ((0, a.shape[1]), (1, b.shape[0])):
            got = [gather_rows(table.flat, table.rows, int(table.meta[e.slot, layer, m, col]),
                               int(table.meta[e.slot, layer, m, 2 + col]), width, table.row_scale)
                   for e in (ours, theirs)]
            assert torch.equal(*got)
    # a staged adapter of another layout is refused, not copied in as garbage
    fp = stage_adapter(load_peft_dir("full", adapters["full"], engine.cfg),
                       type(pool)(pool.cfg, 4, pool.block_tokens, pool.dtype, "cpu"))
    with pytest.raises(ValueError, match="another pool layout"):
        engine.table.insert(fp)
    engine.adapters.close()


def test_host_cache_evicts_lru_within_its_byte_budget(tiny):
    """The host cache keeps adapters up to its byte budget, dropping the least recently used; its
    count is what the staged adapters hold (pinned ones rounded up as torch's allocator does)."""
    from server.pool import pinned_footprint

    assert [pinned_footprint(n) for n in (0, 1, 3, 4, 5, 79_000_000)] == [0, 1, 4, 4, 8, 1 << 27]
    model_dir, adapters = tiny
    engine, _ = build_engine(EngineConfig(str(model_dir), dtype="float32", pool_mb=4))
    mgr = engine.adapters
    names = ["qv", "attn", "full"]
    for name in names:
        mgr.add_weights(load_peft_dir(name, adapters[name], engine.cfg))
    held = {n: mgr._host[n][1].host_bytes for n in names}
    assert all(h > 0 for h in held.values())
    # a budget that holds two of them (qv is the smallest): re-adding qv drops the oldest
    mgr.host_cache_bytes = held["attn"] + held["full"]
    mgr.unload("qv")
    mgr.add_weights(load_peft_dir("qv", adapters["qv"], engine.cfg))
    assert mgr.cached_ids() == ["full", "qv"]          # attn was the least recently used
    assert mgr._host_bytes == held["full"] + held["qv"] <= mgr.host_cache_bytes
    engine.adapters.close()


def test_stream_interval_batches_tokens_after_the_first(tiny):
    """--stream-interval 3: a request's first token goes out alone (time to first token), then
    three per message, and the last message carries the rest with the finish. The tokens and
    log-probabilities are those of stream_interval 1, in the same order."""
    model_dir, adapters = tiny
    outs = {}
    for interval in (1, 3):
        engine = start_engine(model_dir, adapters, pool_mb=4, stream_interval=interval)
        reqs = [Request(f"r{i}", [7, 8, 9 + i], greedy(11), name) for i, name in enumerate(["attn", "", "qv"])]
        msgs = {r.request_id: [] for r in reqs}
        for r in reqs:
            r.emit = msgs[r.request_id].append
            engine.submit(r)
        try:
            assert wait_for(lambda: all(m and m[-1].finish is not None for m in msgs.values()), timeout=60)
        finally:
            engine.stop()
        outs[interval] = {rid: (sum((o.token_ids for o in m), []), sum((o.logprobs for o in m), []))
                          for rid, m in msgs.items()}
        for r in reqs:
            sizes = [len(m.token_ids) for m in msgs[r.request_id]]
            assert sizes == ([1] * 11 if interval == 1 else [1, 3, 3, 3, 1]), (interval, sizes)
            assert msgs[r.request_id][-1].finish == Finish.LENGTH and r.unsent_ids == []
    assert outs[1].keys() == outs[3].keys()
    for rid in outs[1]:
        assert outs[3][rid][0] == outs[1][rid][0] and len(outs[3][rid][0]) == 11
        assert outs[3][rid][1] == pytest.approx(outs[1][rid][1], abs=1e-6)
    with pytest.raises(ValueError, match="stream_interval"):
        start_engine(model_dir, {}, pool_mb=4, stream_interval=0)


def test_a_step_past_a_requests_kv_blocks_is_refused(tiny):
    """A request whose KV blocks do not cover the tokens a step writes (a caller that skipped the
    scheduler's grow) gets a clear error before any kernel runs: on a GPU the K/V writes would go
    through a stale block table entry (an illegal address or another request's pages)."""
    model_dir, adapters = tiny
    engine, _ = build_engine(EngineConfig(str(model_dir), dtype="float32", pool_mb=8))
    sch = engine.scheduler
    r = Request("short", [5, 6, 7] * 12, greedy(4), "")          # 36 tokens: 3 blocks of 16
    sch._grow(r, 20)                                              # blocks for 32 of them
    with pytest.raises(RuntimeError, match="KV blocks for 32 tokens .* up to token 36"):
        engine._run(Step([r], []))
    sch._grow(r, r.total_len)
    engine._run(Step([r], []))                                    # grown, the same step runs
    engine._flush()
    assert len(r.output_ids) == 1 and r.num_computed == 36
    sch.free(r)
    assert engine.pool.kv_pages == 0
    engine.adapters.close()


@pytest.mark.parametrize("change, words", [
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (dict(mlp_bias=True), "mlp_bias=true is not supported"),
    (dict(attention_bias=True), "attention_bias=true is not supported for LlamaForCausalLM"),
    (dict(architectures=None, model_type="gemma"), "unsupported model_type 'gemma'"),
    (dict(architectures=["Phi3ForCausalLM"]), "unsupported architecture 'Phi3ForCausalLM'"),
    (dict(intermediate_size=None), "config.json lacks ['intermediate_size']"),
])
def test_configs_it_would_serve_wrongly_are_refused(change, words):
    """What the engine does not compute as transformers does is refused, naming the field."""
    from server.config import ModelConfig
    from tests.helpers import TINY
    cfg = {k: v for k, v in {**TINY, **change}.items() if v is not None}
    with pytest.raises(ValueError) as e:
        ModelConfig.from_dict(cfg)
    assert words in str(e.value)


def test_a_config_that_does_not_match_its_weights_fails_at_load(tmp_path):
    """num_key_value_heads left out of a GQA config: the k_proj shapes disagree, and loading
    says so (it used to load, then fail every request)."""
    model_dir = make_model(tmp_path / "m", num_key_value_heads=1)
    cfg = json.loads((model_dir / "config.json").read_text())
    del cfg["num_key_value_heads"]
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"k_proj.weight has shape .* num_key_value_heads"):
        build_engine(EngineConfig(str(model_dir), dtype="float32", pool_mb=2))
