"""Admission's future-peak bound: never below the true peak, never above summing final lengths,
and in a real engine it admits what the sum turns away without ever running out of pages."""
import random

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
