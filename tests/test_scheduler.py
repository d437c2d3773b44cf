"""Admission's future-peak bound: never below the true peak, never above summing final lengths,
and in a real engine it admits what the sum turns away without ever running out of pages."""
import random

import pytest

from server.request import Request
from server.runtime import EngineConfig, build_engine
from server.scheduler import FuturePeak, SchedulerConfig
from tests.test_engine import greedy, tiny  # noqa: F401  (the tiny model fixture)


def true_peak_blocks(reqs, B):
    """Simulate: request (c, r) holds ceil((c + t) / B) blocks at step t while t <= r."""
    return max(sum(-(-(c + t) // B) for c, r in reqs if t <= r) for t in range(max(r for _, r in reqs) + 1))


def test_bound_lies_between_the_true_peak_and_the_sum_of_final_lengths():
    rng = random.Random(0)
    B = 16
    for trial in range(300):
        n = rng.randrange(1, 30)
        reqs = [(rng.randrange(1, 300), rng.randrange(0, 300)) for _ in range(n)]
        fp = FuturePeak(B, 1)
        for c, r in reqs:
            fp.add(r, c)
        final = sum(-(-(c + r) // B) for c, r in reqs)
        assert true_peak_blocks(reqs, B) <= fp.pages() <= final, reqs
    # a batch at steady state (requests spread over their lifetimes) is far below the sum
    reqs = [(200 + k, 256 - k) for k in range(0, 256, 2)]
    fp = FuturePeak(B, 1)
    for c, r in reqs:
        fp.add(r, c)
    assert fp.pages() < 0.8 * sum(-(-(c + r) // B) for c, r in reqs)
    # remove undoes add
    before = fp.pages()
    item = fp.add(1000, 5)
    assert fp.pages() > before
    fp.remove(item)
    assert fp.pages() == before


def test_admits_what_summing_final_lengths_refuses_and_never_preempts(tiny):  # noqa: F811
    model_dir, adapters = tiny
    # 2 layers x (K, V): a 16-token block is 4 pages; the pool holds 5 blocks
    engine, _ = build_engine(EngineConfig(str(model_dir), dtype="float32", pool_pages=5 * 4 + 1,
                                          sched=SchedulerConfig(admission="peak")))
    sch = engine.scheduler
    long = Request("long", [5, 6, 7, 8], greedy(60), "")     # ends at 64 tokens: 4 blocks
    shorts = [Request(f"s{i}", [9, 10 + i, 11, 12], greedy(12), "") for i in range(2)]   # 1 block each
    reqs = [long, *shorts]
    # summing final lengths needs 6 blocks > 5; the true peak is 4 (the shorts end first)
    assert sum(-(-r.peak_len // 16) for r in reqs) == 6
    for r in reqs:
        sch.add(r)
    step = sch.schedule()
    assert [r.request_id for r in step.prefills] == ["long", "s0", "s1"]
    engine._run(step)
    while sch.has_work:
        engine._run(sch.schedule())
    assert sch.preemptions == 0
    assert [len(r.output_ids) for r in reqs] == [60, 12, 12]
    # the same tokens as each request alone
    for r in reqs:
        alone = Request(r.request_id, r.prompt_ids, r.params, "")
        sch.add(alone)
        while sch.has_work:
            engine._run(sch.schedule())
        assert alone.output_ids == r.output_ids
    assert engine.pool.kv_pages == 0
    engine.adapters.close()


def test_a_victim_already_in_this_steps_decodes_leaves_them(tiny):  # noqa: F811
    """Preemption takes the newest request, which need not come last in the running list (a
    preempted request comes back with its old arrival). When a later request's growth preempts
    one that this step had already placed among its decodes, that one leaves the step: its
    pages are gone, it must not run."""
    model_dir, _ = tiny
    # 2 layers x (K, V): a 16-token block is 4 pages; the pool holds 3 blocks
    engine, _ = build_engine(EngineConfig(str(model_dir), dtype="float32", pool_pages=3 * 4 + 1,
                                          sched=SchedulerConfig(admission="optimistic")))
    sch = engine.scheduler
    old = Request("old", [5] * 16, greedy(40), "")        # 16 + its first token: a 2nd block
    new = Request("new", [6] * 20, greedy(40), "")        # 20 tokens: 2 blocks, room in the second
    new.arrival = old.arrival + 1
    for r in (old, new):
        sch.add(r)
    step = sch.schedule()
    assert [r.request_id for r in step.prefills] == ["old", "new"] and engine.pool.free_pages == 0
    for r in step.prefills:        # as if the step ran: K/V of the prompts, and each one's first token
        r.num_computed = r.total_len
        r.output_ids.append(9)
    sch.running = [new, old]       # the newest first
    step = sch.schedule()
    assert sch.preemptions == 1 and sch.waiting[0] is new and new.blocks == []
    assert [r.request_id for r in step.decodes] == ["old"] and len(old.blocks) == 2
    engine.adapters.close()


# -------------------------------------------------------------- adapters of waiting requests

def _started(model_dir, source, **kw):
    sched = SchedulerConfig(**{k: kw.pop(k) for k in list(kw) if k in SchedulerConfig.__dataclass_fields__})
    engine, _ = build_engine(EngineConfig(str(model_dir), dtype="float32", sched=sched, **kw), source=source)
    engine.start()
    return engine


def _submit(engine, reqs):
    outs = {r.request_id: [] for r in reqs}
    for r in reqs:
        r.emit = outs[r.request_id].append
        engine.submit(r)
    return outs


def _done(outs, timeout=30):
    from tests.helpers import wait_for
    return wait_for(lambda: all(o and o[-1].finish is not None for o in outs.values()), timeout=timeout)


def test_a_waiting_requests_adapter_dropped_from_the_host_cache_is_fetched_again(tiny):  # noqa: F811
    """A host cache too small for two adapters: while a long request holds the only seat, the
    second fetch pushes the first adapter out. Its request must fetch it again, not wait forever."""
    from server.adapters import LocalSource
    model_dir, adapters = tiny
    engine = _started(model_dir, LocalSource({k: str(v) for k, v in adapters.items()}), pool_mb=4,
                      host_cache_mb=0, max_num_seqs=1)
    try:
        outs = _submit(engine, [Request("blocker", [5, 6, 7], greedy(150), "")])
        outs.update(_submit(engine, [Request("a", [5, 6, 7, 8], greedy(4), "attn"),
                                     Request("b", [5, 6, 7, 8], greedy(4), "qv")]))
        assert _done(outs), [r.request_id for r in engine.scheduler.waiting]
        assert all(o[-1].error is None and sum(len(x.token_ids) for x in o) == n
                   for o, n in zip(outs.values(), [150, 4, 4]))
    finally:
        engine.stop()


def test_a_waiting_requests_adapter_unloaded_is_fetched_again_or_not_found(tiny):  # noqa: F811
    """A replace or delete event unloads the adapter while a request for it waits: the request
    gets the store's current copy (replace), or NOT_FOUND (delete), instead of waiting forever."""
    from server.adapters import LocalSource
    from tests.helpers import wait_for
    model_dir, adapters = tiny
    source = LocalSource({k: str(v) for k, v in adapters.items()})
    engine = _started(model_dir, source, pool_mb=4, max_num_seqs=1)
    try:
        for deleted in (False, True):
            outs = _submit(engine, [Request(f"blocker{deleted}", [5, 6, 7], greedy(100), "")])
            outs.update(_submit(engine, [Request(f"a{deleted}", [5, 6, 7, 8], greedy(4), "attn")]))
            assert wait_for(lambda: "attn" in engine.adapters.cached_ids())
            if deleted:
                del source.dirs["attn"]
            assert engine.call(lambda: engine.adapters.unload("attn")).result(timeout=10)
            assert _done(outs)
            last = outs[f"a{deleted}"][-1]
            if deleted:
                assert last.error[0] == "NOT_FOUND" and "'attn'" in last.error[1]
            else:
                assert last.error is None and sum(len(x.token_ids) for x in outs["aFalse"]) == 4
    finally:
        engine.stop()


@pytest.mark.parametrize("admission", ["peak", "optimistic"])
def test_a_request_that_cannot_fit_beside_its_resident_adapter_is_refused(tiny, admission):  # noqa: F811
    """100 pages; the 'full' adapter takes 60 of them and a request that peaks at 220 tokens needs
    56 of KV. With the adapter already resident and idle (an earlier request left it), peak
    admission must still count its pages and refuse at once; optimistic admission lets it in on
    its prompt, and must refuse it once it cannot grow alone, instead of preempting itself forever."""
    from server.adapters import LocalSource
    model_dir, adapters = tiny
    engine = _started(model_dir, LocalSource({"full": str(adapters["full"])}), pool_pages=100, admission=admission)
    try:
        warm = _submit(engine, [Request("warm", [5, 6, 7], greedy(2), "full")])
        assert _done(warm) and warm["warm"][-1].error is None
        assert engine.adapters.resident["full"].pages == 60 and engine.adapters.resident["full"].refs == 0
        outs = _submit(engine, [Request("big", list(range(3, 23)), greedy(200), "full")])
        assert _done(outs, timeout=60)
        status, msg = outs["big"][-1].error
        assert status == "RESOURCE_EXHAUSTED" and "lower max_new_tokens" in msg
        assert engine.scheduler.preemptions <= 1
        # the engine still serves: a request that fits runs to the end
        ok = _submit(engine, [Request("ok", [5, 6, 7], greedy(8), "full")])
        assert _done(ok) and ok["ok"][-1].error is None and sum(len(x.token_ids) for x in ok["ok"]) == 8
        assert engine.pool.kv_pages == 0
    finally:
        engine.stop()


def test_an_adapter_larger_than_the_pool_is_refused_as_such(tiny):  # noqa: F811
    """No max_new_tokens can help when the adapter alone leaves no room: the message says so."""
    from server.adapters import LocalSource
    model_dir, adapters = tiny
    engine = _started(model_dir, LocalSource({"full": str(adapters["full"])}), pool_pages=62)
    try:
        outs = _submit(engine, [Request("r", [5, 6, 7], greedy(2), "full")])
        assert _done(outs)
        status, msg = outs["r"][-1].error
        assert status == "RESOURCE_EXHAUSTED" and "adapter 'full' takes 60 of the" in msg and "--pool-mb" in msg
        ok = _submit(engine, [Request("base", [5, 6, 7], greedy(3), "")])
        assert _done(ok) and ok["base"][-1].error is None
    finally:
        engine.stop()


def test_an_old_fetch_error_is_not_a_new_requests_answer(tiny):  # noqa: F811
    """A fetch failed while nobody waited for it (its request was cancelled, or it was a
    prefetch); the adapter has been registered since. A new request fetches again."""
    from server.adapters import LocalSource
    from tests.helpers import wait_for
    model_dir, adapters = tiny
    source = LocalSource({})
    engine = _started(model_dir, source, pool_mb=4)
    try:
        engine.adapters.prefetch("attn")
        assert wait_for(lambda: engine.adapters.has_failed("attn"))      # not there yet
        source.dirs["attn"] = str(adapters["attn"])
        outs = _submit(engine, [Request("r", [5, 6, 7], greedy(3), "attn")])
        assert _done(outs) and outs["r"][-1].error is None
        assert sum(len(o.token_ids) for o in outs["r"]) == 3
    finally:
        engine.stop()


def test_a_preempted_request_keeps_the_adapter_version_it_started_on(tiny, tmp_path):  # noqa: F811
    """The adapter is replaced (the engine unloads it) while its request runs, and the request
    is then preempted: recomputed, it must go on with the version it started on (it took the new
    version's weights half-way through its output)."""
    import json

    from server.adapters import LocalSource
    from tests.helpers import ADAPTER_SPECS, make_adapter, wait_for
    model_dir, adapters = tiny
    rank, alpha, targets = ADAPTER_SPECS["attn"]
    v2 = make_adapter(tmp_path / "attn-v2", json.loads((model_dir / "config.json").read_text()), rank, alpha,
                      targets, seed=99)
    prompt, n_new = [5, 6, 7, 8, 9], 120
    alone = _started(model_dir, LocalSource({"rx": str(adapters["attn"])}), pool_mb=4)
    try:
        ref = _submit(alone, [Request("r", prompt, greedy(n_new), "rx")])
        assert _done(ref)
        ref_tokens = [t for o in ref["r"] for t in o.token_ids]
    finally:
        alone.stop()
    source = LocalSource({"rx": str(adapters["attn"])})
    # 2 layers x (K, V): 4 pages a 16-token block. Four base requests grow to 10 blocks each; the
    # adapter request, the newest, is the one preempted when the pool runs out.
    engine = _started(model_dir, source, pool_pages=4 * 10 * 3 + 40, admission="optimistic")
    try:
        outs = _submit(engine, [Request(f"b{i}", [3 + i, 4, 5], greedy(150), "") for i in range(4)])
        r = Request("r", prompt, greedy(n_new), "rx")
        outs.update(_submit(engine, [r]))
        assert wait_for(lambda: len(r.output_ids) >= 10, timeout=30)
        source.dirs["rx"] = str(v2)                                   # replaced in the store ...
        engine.call(lambda: engine.adapters.unload("rx")).result(timeout=10)   # ... and the event
        at_replace = r.preempted
        assert _done(outs, timeout=120)
        assert r.preempted > at_replace, "the test needs the request preempted after the replace"
        got = [t for o in outs["r"] for t in o.token_ids]
        assert outs["r"][-1].error is None and got == ref_tokens
        assert engine.pool.kv_pages == 0 and not engine.adapters.stale
    finally:
        engine.stop()


def test_peak_admission_counts_a_replaced_adapters_new_version(tiny, tmp_path):  # noqa: F811
    """r1 runs on an adapter's version 1 when it is replaced; r2 (same adapter) and r3 (base)
    arrive together. r2 gets version 2, a second copy of the adapter's pages beside the stale
    one r1 still holds: peak admission must count those pages, and never preempt."""
    import json

    from server.lora import load_peft_dir
    from tests.helpers import ADAPTER_SPECS, make_adapter
    model_dir, _ = tiny
    cfg = json.loads((model_dir / "config.json").read_text())
    rank, alpha, targets = ADAPTER_SPECS["full"]
    v1, v2 = (make_adapter(tmp_path / f"v{i}", cfg, rank, alpha, targets, seed=i) for i in (1, 2))
    engine, _ = build_engine(EngineConfig(str(model_dir), dtype="float32", pool_pages=200,
                                          sched=SchedulerConfig(admission="peak")))
    sch, mgr = engine.scheduler, engine.adapters
    mgr.add_weights(load_peft_dir("X", v1, engine.cfg), version=1)
    r1 = Request("r1", [5, 6, 7, 8], greedy(200), "X")
    sch.add(r1)
    for _ in range(3):
        engine._run(sch.schedule())
    mgr.unload("X")                                                   # the replaced event
    mgr.add_weights(load_peft_dir("X", v2, engine.cfg), version=2)    # the new version, fetched
    r2, r3 = Request("r2", [5, 6, 7, 9], greedy(200), "X"), Request("r3", [5, 6, 7, 10], greedy(100), "")
    sch.add(r2)
    sch.add(r3)
    while sch.has_work:
        engine._run(sch.schedule())
        engine._fail_rejected()
    assert sch.preemptions == 0
    assert [len(r.output_ids) for r in (r1, r2, r3)] == [200, 200, 100]
    assert r1.adapter_version == 1 and r2.adapter_version == 2


def test_admission_waits_when_the_host_cache_drops_an_adapter_under_it(tiny):  # noqa: F811
    """A fetch landing between admission's check and its load can push the adapter out of the
    host cache: the request waits for a refetch; the step and the requests it admitted go on."""
    import time

    from server.adapters import LocalSource
    from server.lora import load_peft_dir
    model_dir, adapters = tiny
    engine, _ = build_engine(EngineConfig(str(model_dir), dtype="float32", pool_mb=4),
                             source=LocalSource({k: str(v) for k, v in adapters.items()}))
    sch, mgr = engine.scheduler, engine.adapters
    for name in ("attn", "qv"):
        mgr.add_weights(load_peft_dir(name, adapters[name], engine.cfg))
    real, dropped = mgr.acquire, []

    def acquire_once_evicted(aid):
        if aid == "qv" and not dropped:          # the eviction lands right here, once
            dropped.append(aid)
            mgr.unload("qv")
            raise KeyError(aid)
        return real(aid)
    mgr.acquire = acquire_once_evicted
    reqs = [Request("a", [5, 6, 7], greedy(4), "attn"), Request("q", [5, 6, 8], greedy(4), "qv"),
            Request("b", [5, 6, 9], greedy(4), "")]
    for r in reqs:
        sch.add(r)
    for _ in range(200):
        if not sch.has_work:
            break
        engine._run(sch.schedule())
        engine._fail_rejected()
        if not sch.has_work:
            break
        time.sleep(0.01)                         # (the refetch runs on a fetch thread)
    assert dropped and [len(r.output_ids) for r in reqs] == [4, 4, 4]
    assert engine.pool.kv_pages == 0
