"""The engine's device block tables: incremental writes, row reuse, growth, rewrite after preemption."""
import torch

from server.block_tables import BlockTables
from server.request import Request
from server.sampler import SamplingParams


def _req(rid: str, blocks: list[list[int]]) -> Request:
    r = Request(rid, [1, 2, 3], SamplingParams())
    r.blocks = [list(b) for b in blocks]
    return r


def _expected(reqs, n_blocks, per):
    out = torch.zeros(len(reqs), n_blocks, per, dtype=torch.int32)
    for i, r in enumerate(reqs):
        if r.blocks:
            out[i, :len(r.blocks)] = torch.tensor(r.blocks, dtype=torch.int32)
    return out


def test_blocks_written_incrementally_and_gathered():
    g = torch.Generator().manual_seed(0)
    per = 6
    bt = BlockTables(rows=2, max_blocks=8, pages_per_block=per, device=torch.device("cpu"))
    reqs = [_req(f"r{i}", torch.randint(0, 1000, (i + 1, per), generator=g).tolist()) for i in range(3)]
    for step in range(5):
        rows = bt.sync(reqs)
        n = max(len(r.blocks) for r in reqs)
        assert torch.equal(bt.gather(rows, n), _expected(reqs, n, per)), step
        assert len(set(rows.tolist())) == len(reqs)          # distinct rows, grown past 2
        for r in reqs:                                        # each gains a block
            r.blocks.append(torch.randint(0, 1000, (per,), generator=g).tolist())
    assert bt.rows >= 3


def test_rows_are_released_and_rewritten_after_preemption():
    per = 4
    bt = BlockTables(rows=2, max_blocks=4, pages_per_block=per, device=torch.device("cpu"))
    a, b = _req("a", [[1, 2, 3, 4], [5, 6, 7, 8]]), _req("b", [[9, 9, 9, 9]])
    bt.sync([a, b])
    row_a = a.bt_row
    # preemption: the scheduler frees the pages and resets the count; new pages come later
    a.blocks, a.bt_len = [[40, 41, 42, 43]], 0
    rows = bt.sync([a, b])
    assert a.bt_row == row_a
    assert torch.equal(bt.gather(rows, 1), _expected([a, b], 1, per))
    bt.release(b)
    assert b.bt_row == -1
    c = _req("c", [[7, 7, 7, 7], [8, 8, 8, 8]])
    rows = bt.sync([a, c])
    assert c.bt_row != a.bt_row
    assert torch.equal(bt.gather(rows, 2)[1], _expected([c], 2, per)[0])
    assert bt.rows == 2                                       # b's row was reused, no growth


def test_too_many_blocks_is_refused():
    bt = BlockTables(rows=1, max_blocks=2, pages_per_block=2, device=torch.device("cpu"))
    r = _req("r", [[1, 1], [2, 2], [3, 3]])
    try:
        bt.sync([r])
    except ValueError as e:
        assert "3 KV blocks" in str(e)
    else:
        raise AssertionError("3 blocks fit a 2-block table")


def test_token_pages_follow_each_tokens_block():
    per, B = 2, 4
    bt = BlockTables(rows=2, max_blocks=3, pages_per_block=per, device=torch.device("cpu"))
    a, b = _req("a", [[1, 2], [3, 4], [5, 6]]), _req("b", [[7, 8]])
    rows = bt.sync([a, b])
    pos = torch.tensor([3, 4, 9, 2])          # a: a prefill run of 3 tokens; b: one decode token
    got = bt.token_pages(rows, [3, 1], pos, B)
    assert got.tolist() == [[1, 2], [3, 4], [5, 6], [7, 8]]
    assert bt.token_pages(rows, [1, 1], torch.tensor([9, 2]), B).tolist() == [[5, 6], [7, 8]]
