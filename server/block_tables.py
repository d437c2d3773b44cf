"""Every live request's KV block table, kept on the device and updated in place.

A block table row holds 2L page ids per KV block (the pool gives each layer's K and V their own
pages), so rebuilding a batch's [S, blocks, 2L] table from Python lists every step cost 4-7 ms of
host time at batch 256 on the H100 host, all of it on the critical path. Here each request owns a
row of one device tensor; a step writes only the blocks added since the last step (a request gains
one every block_tokens tokens) and gathers the batch's rows with one device index.
"""
from __future__ import annotations

import torch

from kernels.batch import to_device
from server.request import Request


class BlockTables:
    def __init__(self, rows: int, max_blocks: int, pages_per_block: int, device: torch.device):
        self.max_blocks, self.per, self.device = max_blocks, pages_per_block, device
        self.table = torch.zeros(rows, max_blocks, pages_per_block, dtype=torch.int32, device=device)
        self._free = list(range(rows - 1, -1, -1))

    @property
    def rows(self) -> int:
        return self.table.shape[0]

    def _grow(self) -> None:
        """More rows (a burst of preempted requests can outnumber the running cap)."""
        old = self.rows
        self.table = torch.cat([self.table, torch.zeros_like(self.table)])
        self._free = list(range(2 * old - 1, old - 1, -1)) + self._free

    def sync(self, reqs: list[Request]) -> torch.Tensor:
        """Give each request a row, write blocks it gained since the last step; returns the
        requests' rows as an int64 device tensor."""
        rows, new_rows, new_blocks, new_pages = [], [], [], []
        for req in reqs:
            if req.bt_row < 0:
                if not self._free:
                    self._grow()
                req.bt_row, req.bt_len = self._free.pop(), 0
            n = len(req.blocks)
            if n > self.max_blocks:
                raise ValueError(f"request {req.request_id} holds {n} KV blocks, the table has {self.max_blocks}")
            if req.bt_len < n:
                for b in range(req.bt_len, n):
                    new_rows.append(req.bt_row)
                    new_blocks.append(b)
                    new_pages.append(req.blocks[b])
                req.bt_len = n
            rows.append(req.bt_row)
        if new_rows:
            pages = to_device(new_pages, torch.int32, self.device)
            idx = to_device([new_rows, new_blocks], torch.int64, self.device)
            self.table[idx[0], idx[1]] = pages
        return to_device(rows, torch.int64, self.device)

    def gather(self, rows: torch.Tensor, n_blocks: int) -> torch.Tensor:
        """The batch's block tables [S, n_blocks, 2L] (a device gather)."""
        return self.table[rows, :n_blocks]

    def token_pages(self, rows: torch.Tensor, tokens_per_row: list[int], positions: torch.Tensor,
                    block_tokens: int) -> torch.Tensor:
        """The pages [T, 2L] that each new token's K/V land in (a device gather): tokens come in
        runs of tokens_per_row[i] for rows[i], at the given positions."""
        if len(tokens_per_row) != positions.numel():
            rows = torch.repeat_interleave(rows, to_device(tokens_per_row, torch.int64, rows.device),
                                           output_size=positions.numel())
        return self.table[rows, positions // block_tokens]

    def release(self, req: Request) -> None:
        """The request is finished: its row goes back (its pages were freed by the scheduler)."""
        if req.bt_row >= 0:
            self._free.append(req.bt_row)
            req.bt_row, req.bt_len = -1, 0
