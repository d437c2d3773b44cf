"""The unified memory pool: one preallocated region holding both the KV cache and LoRA weights.

S-LoRA pages the pool by one hidden-size vector. That breaks for grouped-query attention
(K width < hidden) and for MLP targets (intermediate != hidden), so loraserve generalizes it:

* a page is ``block_tokens * kv_width`` elements: B tokens of one layer's K (or V);
* a KV block (B tokens of a sequence) takes ``2 * num_layers`` pages, page ``2*l`` holds layer l's
  K and ``2*l + 1`` its V, so a sequence's block table is ``[n_blocks, 2L]`` page ids;
* an adapter's weights are rows (A: r rows of in_features; B^T: r rows of out_features) packed
  into whole pages anywhere in the pool, each row 16-byte aligned and never straddling a page.
  A global row table maps each row to its element offset in the pool, and a per-slot index
  table gives, for each (layer, module), where that matrix's rows start and its rank.

Adapter rows are stored in the model's dtype, or (opt-in, ``adapter_dtype=torch.int8``) as int8
with one fp32 scale per row (symmetric, the row's max |w| / 127). A decode step over many
distinct adapters is bound by reading their rows; int8 halves those bytes (and the host cache's).
The kernels then read ``pool.adapter_flat`` (the pool's bytes as int8) and the scales beside the
row table, and dequantize in registers. Per-row scales factor out of both products exactly:
shrink scales its output column r, expand scales its input v[r].

int4 rows (opt-in, ``adapter_dtype=INT4``) halve those bytes again: two weights to a byte (column
2i in the low nibble, 2i + 1 in the high one, each a two's complement number in [-8, 7]), one fp32
scale per row as for int8, the scale picked per row to minimise the rounding error (clipping the
row's largest values where that pays). ``pool.adapter_flat`` is then the pool's bytes as uint8,
which is how the kernels and the reference tell the two formats apart.

Kernels read A and B in place through the row table: no per-step copy into contiguous buffers.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from kernels.reference import unpack_int4  # noqa: F401  (the format's inverse, beside pack_int4)
from server.config import ATTENTION, TARGET_MODULES, ModelConfig

ROW_ALIGN = 8  # elements, and at least 16 bytes (int8 rows: 16), so kernels can use wide loads
INT4 = torch.uint8  # the adapter dtype of int4 rows: bytes of two weights each (see the module doc)
QUANTIZED = {"int8": torch.int8, "int4": INT4}    # --adapter-dtype's quantized formats


class PoolExhausted(RuntimeError):
    """Not enough free pages; the scheduler preempts or waits."""


@dataclass
class PoolStats:
    total_pages: int
    kv_pages: int
    adapter_pages: int
    free_pages: int
    page_bytes: int
    block_tokens: int
    adapter_dtype: str = ""


class UnifiedPool:
    """Pages of one size shared by KV blocks and adapter weights; no reserved partition."""

    def __init__(self, cfg: ModelConfig, num_pages: int, block_tokens: int,
                 dtype: torch.dtype, device: torch.device | str, adapter_dtype: torch.dtype | None = None):
        self.cfg = cfg
        self.block_tokens = block_tokens
        self.page_elems = block_tokens * cfg.kv_width
        self.dtype = dtype
        self.device = torch.device(device)
        self.data = torch.zeros(num_pages, self.page_elems, dtype=dtype, device=self.device)  # incl. scratch
        self.flat = self.data.view(-1)
        # adapter rows: the model's dtype, or int8 with a scale per row (see the module doc)
        self.adapter_dtype = adapter_dtype or dtype
        if self.adapter_dtype not in (dtype, torch.int8, INT4):
            raise ValueError(f"adapter rows are stored as {dtype}, int8 or int4, not {self.adapter_dtype}")
        self.quantized = self.adapter_dtype in (torch.int8, INT4)
        self.int4 = self.adapter_dtype == INT4
        self.adapter_flat = self.data.view(self.adapter_dtype).view(-1) if self.quantized else self.flat
        esize = self.adapter_flat.element_size()
        self.row_elems = self.page_elems * self.data.element_size() // esize   # adapter elements per page
        self.row_align = max(ROW_ALIGN, 16 // esize)
        # The last page is scratch: padding rows of a CUDA-graph batch read and write only it.
        self.scratch_page = num_pages - 1
        self.num_pages = num_pages - 1
        # Pop from the end: low page ids are handed out first, which keeps tests readable.
        self._free = list(range(self.num_pages - 1, -1, -1))
        self.kv_pages = 0
        self.adapter_pages = 0

    # -- pages ---------------------------------------------------------------------------
    @property
    def free_pages(self) -> int:
        return len(self._free)

    def alloc(self, n: int, kind: str) -> list[int]:
        if n > len(self._free):
            raise PoolExhausted(f"need {n} pages, {len(self._free)} free")
        pages = self._free[len(self._free) - n:]      # the last n, as n pops would give them
        del self._free[len(self._free) - n:]
        pages.reverse()
        self._count(kind, n)
        return pages

    def free(self, pages: list[int], kind: str) -> None:
        self._free.extend(reversed(pages))
        self._count(kind, -len(pages))

    def _count(self, kind: str, n: int) -> None:
        if kind == "kv":
            self.kv_pages += n
        elif kind == "adapter":
            self.adapter_pages += n
        else:
            raise ValueError(kind)

    def stats(self) -> PoolStats:
        return PoolStats(self.num_pages, self.kv_pages, self.adapter_pages, self.free_pages,
                         self.page_elems * self.data.element_size(), self.block_tokens, self.adapter_format)

    @property
    def adapter_format(self) -> str:
        """How adapter rows are stored: the model's dtype, "int8" or "int4"."""
        return "int4" if self.int4 else str(self.adapter_dtype).removeprefix("torch.")

    def row_units(self, width: int) -> int:
        """Elements of ``adapter_flat`` a row of ``width`` weights takes (int4: two to a byte)."""
        return (width + 1) // 2 if self.int4 else width

    @property
    def weight_bytes(self) -> float:
        """Bytes one adapter weight takes in the pool (int4: half a byte)."""
        return 0.5 if self.int4 else self.adapter_flat.element_size()

    # -- KV view ---------------------------------------------------------------------------
    def kv_view(self) -> torch.Tensor:
        """The pool as KV pages: [num_pages, block_tokens, num_kv_heads, head_dim]."""
        c = self.cfg
        return self.data.view(self.data.shape[0], self.block_tokens, c.num_kv_heads, c.head_dim)

    def kv_pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_tokens) * 2 * self.cfg.num_layers

    # -- adapter rows ----------------------------------------------------------------------
    def pack_rows(self, widths: list[int]) -> tuple[int, list[tuple[int, int]]]:
        """Lay out rows of the given widths into pages: (pages needed, [(page index, offset)]),
        offsets in adapter elements (``row_elems`` to a page)."""
        placed, page, off, P, align = [], 0, 0, self.row_elems, self.row_align
        for w in widths:
            if w > P:
                raise ValueError(f"a row of {w} elements does not fit a page of {P}; raise block_tokens")
            if off + w > P:
                page, off = page + 1, 0
            placed.append((page, off))
            off += -(-w // align) * align
        return (page + 1 if placed else 0), placed


@dataclass
class AdapterSlot:
    """Where one resident adapter lives in the pool."""
    slot: int
    pages: list[int]
    row_start: int     # first entry of this adapter in the global row table
    num_rows: int
    copied: "torch.cuda.Event | None" = None   # end of the side-stream page copy (CUDA)


class AdapterTable:
    """Index tables that let kernels find adapter rows in the pool.

    * ``rows``: int64 [capacity] element offsets into ``pool.flat``, one per stored row; each
      adapter owns a contiguous range, compacted when an adapter leaves (as S-LoRA does).
    * ``meta``: int32 [max_slots, L, M, 4] = (A row start, B^T row start, A rows, B^T rows); 0 rows
      means the adapter does not target that module in that layer. Kernels take ``meta[:, l, m]``.
    * ``scaling``: float32 [max_slots]: lora_alpha / r (or / sqrt(r) with rsLoRA).
    * ``row_scale``: float32 [capacity] beside ``rows`` when the pool stores int8 or int4 rows,
      else None.
    * ``flat``: the pool as kernels read adapter rows (``pool.adapter_flat``).
    """

    def __init__(self, pool: UnifiedPool, max_slots: int):
        c = pool.cfg
        self.pool = pool
        self.max_slots = max_slots
        dev = pool.device
        # Sized once for the most rows the pool could ever hold (every page full of the narrowest
        # rows): CUDA graphs capture this tensor's address, so it must never be reallocated.
        narrowest = pool.row_units(min(min(c.module_dims(m)) for m in TARGET_MODULES))
        per_page = max(1, pool.row_elems // (-(-narrowest // pool.row_align) * pool.row_align))
        self.rows = torch.zeros(pool.num_pages * per_page, dtype=torch.int64, device=dev)
        self.row_scale = torch.zeros_like(self.rows, dtype=torch.float32) if pool.quantized else None
        self.flat = pool.adapter_flat
        self.num_rows = 0
        self.meta = torch.zeros(max_slots, c.num_layers, len(TARGET_MODULES), 4, dtype=torch.int32, device=dev)
        self.scaling = torch.zeros(max_slots, dtype=torch.float32, device=dev)
        # host lists (a step reads one entry per request: tensor indexing would cost ~1 ms at 256)
        self.max_rank = [0] * max_slots       # for kernel bounds
        self.mlp = [False] * max_slots        # targets gate/up/down
        self.nbytes = [0] * max_slots         # pool bytes it occupies (~ what a step reads of it)
        self.slots: dict[int, AdapterSlot] = {}
        self._free_slots = list(range(max_slots - 1, -1, -1))

    @property
    def full(self) -> bool:
        """Every adapter slot is taken."""
        return not self._free_slots

    def insert(self, staged: "StagedAdapter", stream: "torch.cuda.Stream | None" = None) -> AdapterSlot:
        """Copy a staged adapter into freshly allocated pages and index it. Raises PoolExhausted.

        The page images (the bulk: one host-to-device copy and one index_copy) go on ``stream``, a
        side stream, so they overlap the steps running on the default stream; the entry's ``copied``
        event marks their end, and the first step that reads the adapter must wait on it. The small
        index writes stay on the default stream, ordered with compaction (remove).
        """
        if not self._free_slots:
            raise PoolExhausted(f"all {self.max_slots} adapter slots are in use")
        pool = self.pool
        if (staged.row_scale is not None) != pool.quantized or staged.images.shape[1] != pool.row_elems:
            raise ValueError("the adapter was staged for another pool layout (adapter dtype or page size)")
        pages = pool.alloc(staged.num_pages, "adapter")
        slot = self._free_slots.pop()
        P = pool.row_elems
        page_ids = torch.tensor(pages, dtype=torch.int64)
        start = self.num_rows
        meta = staged.meta.clone()
        meta[..., :2] += torch.where(meta[..., 3:4] > 0, start, 0).to(meta.dtype)
        dev = pool.device
        # From pageable memory a "non_blocking" copy first waits for its stream to drain: on the
        # side stream that is the previous adapter's page copy (milliseconds), so every index
        # goes through pinned memory and the engine thread never waits here.
        to = (lambda t: t.pin_memory().to(dev, non_blocking=True)) if dev.type == "cuda" else (lambda t: t)  # noqa: E731
        done = None
        if stream is not None:
            # the pages may have been freed by a request whose last step is still queued (the
            # engine launches a step before it reads the previous one's tokens): write them only
            # after the work queued so far has read them
            stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            if dev.type == "cuda":
                images = staged.images.to(dev, non_blocking=True)
                pool.data.view(images.dtype).index_copy_(0, to(page_ids), images)
            else:
                _copy_pages(pool.data.view(staged.images.dtype), pages, staged.images)
            if stream is not None:
                done = torch.cuda.Event()
                done.record(stream)
        # each row's element offset, computed where it is needed (on the host, the integer
        # division over ~16K rows of a rank-64 adapter cost ~0.3 ms of the engine thread)
        rel = to(staged.rel_offsets)
        n_rows = rel.numel()
        self.rows[start:start + n_rows] = to(page_ids)[rel // P] * P + rel % P
        if self.row_scale is not None:
            self.row_scale[start:start + n_rows] = to(staged.row_scale)
        self.meta[slot] = to(meta)
        # fill_, not `scaling[slot] = x`: assigning a Python number to an element of a CUDA tensor
        # waited for the device (0.7 ms per load on the H100, 15 ms behind a queued step)
        self.scaling[slot:slot + 1].fill_(staged.scaling)
        self.num_rows += n_rows
        self.max_rank[slot] = staged.max_rank
        self.mlp[slot] = bool((staged.meta[:, len(ATTENTION):, 2:] > 0).any())
        self.nbytes[slot] = staged.nbytes
        entry = AdapterSlot(slot, pages, start, n_rows, done)
        self.slots[slot] = entry
        return entry

    def remove(self, slot: int) -> None:
        entry = self.slots.pop(slot)
        self.pool.free(entry.pages, "adapter")
        # Compact the row table and shift the starts of adapters stored after this one.
        s, n = entry.row_start, entry.num_rows
        tail = self.rows[s + n:self.num_rows].clone()
        self.rows[s:s + tail.numel()] = tail
        if self.row_scale is not None:
            self.row_scale[s:s + tail.numel()] = self.row_scale[s + n:self.num_rows].clone()
        self.num_rows -= n
        for o in self.slots.values():
            if o.row_start > s:
                o.row_start -= n
        # Every row start past the removed range moves down by n: one masked update on the device.
        # (It was built on the host and copied up, and a copy from pageable memory first waits for
        # the stream to drain: every eviction stalled the engine thread behind the queued step.)
        starts = self.meta[..., :2]
        starts -= ((starts >= s + n) & (self.meta[..., 3:4] > 0)).to(starts.dtype) * n
        self.meta[slot].zero_()            # (zero_, not `= 0`: see insert)
        self.scaling[slot:slot + 1].zero_()
        self.max_rank[slot] = 0
        self.mlp[slot] = False
        self.nbytes[slot] = 0
        self._free_slots.append(slot)


def _copy_pages(dst: torch.Tensor, pages: list[int], images: torch.Tensor) -> None:
    """dst[pages[k]] = images[k], one copy per run of consecutive page ids (the CPU engine's
    load: index_copy_ of whole pages ran ~15x slower than plain copies on a CPU core, 5.6 vs
    0.4 ms for a rank-8 Llama-7B adapter's 64 pages)."""
    k = 0
    while k < len(pages):
        end = k + 1
        while end < len(pages) and pages[end] == pages[end - 1] + 1:
            end += 1
        dst[pages[k]:pages[k] + end - k].copy_(images[k:end])
        k = end


@dataclass
class StagedAdapter:
    """An adapter laid out as page images in host memory, ready to copy into any free pages.

    ``images`` [num_pages, pool.row_elems] holds the rows exactly as they will sit in the pool
    (in the pool's adapter dtype); ``rel_offsets`` [rows] are element offsets relative to the
    adapter's own first page; ``row_scale`` [rows] the int8 rows' scales (None unquantized);
    ``meta`` [L, M, 4] holds (A row start, B^T row start, A rows, B^T rows) relative to the adapter's first row.
    This is what the host cache keeps (pinned on CUDA), so a warm load is one copy.
    """
    images: torch.Tensor
    rel_offsets: torch.Tensor
    meta: torch.Tensor
    scaling: float
    max_rank: int
    row_scale: torch.Tensor | None = None

    @property
    def num_pages(self) -> int:
        return self.images.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._tensors())

    @property
    def host_bytes(self) -> int:
        """Host memory it holds. Pinned tensors come from torch's caching host allocator, which
        rounds every allocation up to a power of two: a 79 MB adapter pins 128 MB. The host
        cache's budget counts these, so --host-cache-mb bounds what is really pinned."""
        return sum(pinned_footprint(t.nbytes) if t.is_pinned() else t.nbytes for t in self._tensors())

    def _tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.images, self.row_scale) if t is not None]


def pinned_footprint(nbytes: int) -> int:
    """Bytes torch's caching host allocator pins for an allocation of ``nbytes`` (a power of two)."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


def stage_adapter(weights: "LoraWeights", pool: UnifiedPool, pin: bool = False) -> StagedAdapter:  # noqa: F821
    """Pack an adapter's A rows and B^T rows into page images for ``pool``'s page size and
    adapter dtype (int8, int4: each row quantized with its own scale)."""
    cfg, P = pool.cfg, pool.row_elems
    mats = list(weights.matrices())
    pieces = [m for _, (a, b) in mats for m in (a, b.t())]      # in row order: A, then B^T
    widths = [pool.row_units(w) for m in pieces for w in [m.shape[1]] * m.shape[0]]
    n_pages, placed = pool.pack_rows(widths)
    # every byte a kernel reads is written below; page tails and row padding are never read
    images = torch.empty(n_pages, P, dtype=pool.adapter_dtype, pin_memory=pin)
    flat = images.view(-1)
    rel = torch.tensor([p * P + off for p, off in placed], dtype=torch.int64)
    meta = torch.zeros(cfg.num_layers, len(TARGET_MODULES), 4, dtype=torch.int32)
    i = 0
    for (layer, module), (a, b) in mats:
        ra, rb = a.shape[0], b.shape[1]
        meta[layer, TARGET_MODULES.index(module)] = torch.tensor([i, i + ra, ra, rb])
        i += ra + rb
    scales = torch.empty(len(placed), dtype=torch.float32) if pool.quantized else None
    row = 0
    for batch in _quant_batches(pieces) if pool.quantized else [[m] for m in pieces]:
        if scales is not None:
            n = sum(m.shape[0] for m in batch)
            quantize = quantize_rows_int4 if pool.int4 else quantize_rows
            q, scales[row:row + n] = quantize(batch[0] if len(batch) == 1 else torch.cat(batch))
            batch = q.split([m.shape[0] for m in batch])
        for m in batch:      # (copied while the batch is still in cache)
            _copy_rows(flat, rel[row:row + m.shape[0]], m.to(pool.adapter_dtype), pool.row_align)
            row += m.shape[0]
    if scales is not None and pin:
        scales = scales.pin_memory()
    return StagedAdapter(images, rel, meta, float(weights.scaling), weights.max_rank, scales)


QUANT_BATCH_ROWS = 64


def _quant_batches(pieces: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive same-width matrices grouped into batches of about QUANT_BATCH_ROWS rows, each
    quantized by one quantize_rows call. One call per matrix paid ~10 small ops each: a rank-8
    adapter's staging took 2-3x its copies. One call over all of them built temporaries of
    hundreds of MB and lost the cache. Rows are quantized independently, so the values and
    scales are exactly those of each matrix alone (tests/test_kernels.py checks)."""
    batches: list[list[torch.Tensor]] = []
    rows = 0
    for m in pieces:
        if batches and rows < QUANT_BATCH_ROWS and m.shape[1] == batches[-1][0].shape[1]:
            batches[-1].append(m)
            rows += m.shape[0]
        else:
            batches.append([m])
            rows = m.shape[0]
    return batches


def quantize_rows(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (q, scale) with m ~= q * scale[:, None]; a zero row gets scale 0."""
    m = m.float()
    scale = m.abs().amax(dim=1) / 127
    q = torch.round(m / scale.clamp(min=torch.finfo(torch.float32).tiny)[:, None]).clamp(-127, 127)
    return q.to(torch.int8), scale


INT4_CLIPS = (1.0, 0.9, 0.8, 0.7, 0.6)


def quantize_rows_int4(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 per row, packed: (bytes [n, ceil(w / 2)] uint8, scale [n]) with m ~=
    unpack_int4(bytes, w) * scale[:, None]. Each row's scale is the one of INT4_CLIPS x max|w| / 7
    with the least squared error: with 16 levels the few largest values of a row of thousands cost
    the rest more resolution than clipping them costs (rms error over a Gaussian row of 4096: 0.11 of
    its std at the best clip, 0.16 at none; int8 rows: 0.009)."""
    m = m.float()
    amax = m.abs().amax(dim=1)
    safe = amax.clamp(min=torch.finfo(torch.float32).tiny)
    best_q, best_s = torch.zeros_like(m), torch.zeros_like(amax)      # a zero row keeps scale 0
    best_err = torch.full_like(amax, float("inf"))
    for c in INT4_CLIPS:
        scale = safe * (c / 7)
        q = torch.round(m / scale[:, None]).clamp(-8, 7)
        err = (q * scale[:, None] - m).square().sum(dim=1)
        better = (err < best_err) & (amax > 0)
        best_q = torch.where(better[:, None], q, best_q)
        best_s = torch.where(better, scale, best_s)
        best_err = torch.where(better, err, best_err)
    return pack_int4(best_q.to(torch.int8)), best_s


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [n, w] -> uint8 [n, ceil(w / 2)]: column 2i in the low nibble, 2i + 1
    in the high one (an odd width's last high nibble is 0)."""
    if q.shape[1] % 2:
        q = torch.cat([q, q.new_zeros(q.shape[0], 1)], dim=1)
    return ((q[:, 0::2] & 0xF) | (q[:, 1::2] << 4)).view(torch.uint8)


def _copy_rows(flat: torch.Tensor, offs: torch.Tensor, m: torch.Tensor, align: int) -> None:
    """Write matrix rows to their offsets, one slice per run of rows that sit back to back."""
    w = m.shape[1]
    step = -(-w // align) * align
    offs = offs.tolist()
    j = 0
    while j < len(offs):
        k = j + 1
        while k < len(offs) and offs[k] == offs[k - 1] + step:
            k += 1
        if step == w:      # contiguous run: one copy
            flat[offs[j]:offs[j] + (k - j) * w] = m[j:k].reshape(-1)
        else:              # padded rows (widths not a multiple of 8: tiny test models only)
            for t in range(j, k):
                flat[offs[t]:offs[t] + w] = m[t]
        j = k
