"""The KV-cache manager: which fixed-size blocks each request holds, and the prefix cache.

Bookkeeping only (block ids and reference counts on the host); the tensors live in
:class:`~mcore.inference.context.DynamicInferenceContext`. Block 0 is reserved as the scratch
block that padding tokens write to; requests get blocks ``1 .. num_blocks - 1``.

The :class:`BlockTable` mirrors every live request's block ids in one persistent array, a row
per request, written only when a block is added or a request leaves: a step's batch takes its
rows from it instead of rebuilding block tables from lists, so the host work of a decode step
does not grow with the length of the requests.

Prefix caching: once a block is full, it is named by a hash of its tokens chained to the hash of
the block before it, so equal names mean equal token prefixes and so equal keys/values (for
the same weights). A new request whose prompt starts with named blocks takes references to
them instead of recomputing. A block whose last reference goes keeps its name and stays
cached until its memory is needed (least recently released first). The last token of a prompt
is always recomputed, because its logits are needed, so a shared block is never written to.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from mcore.inference.errors import RequestId
from mcore.inference.request import Request

SCRATCH_BLOCK = 0
"""The block padding tokens write to; never given to a request."""


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """The name of a full block: its tokens chained to the name of the block before it."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockPool:
    """Reference-counted blocks, free ones, and cached (named) ones with no references."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(
                f"the KV cache needs at least 2 blocks (one is scratch), got {num_blocks}"
            )
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.names: list[bytes | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(1, num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        """Named blocks without references, least recently released first."""
        self._by_name: dict[bytes, int] = {}

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    def num_available(self) -> int:
        """Blocks that an allocation can take now (free, or cached without references)."""
        return len(self._free) + len(self._evictable)

    def num_in_use(self) -> int:
        return self.num_usable - self.num_available()

    def allocate(self, n: int) -> list[int] | None:
        """``n`` blocks with one reference each, or None (nothing taken) if too few."""
        if n > self.num_available():
            return None
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                self._forget(block)
            self.ref_counts[block] = 1
            out.append(block)
        return out

    def lookup(self, name: bytes) -> int | None:
        return self._by_name.get(name)

    def take(self, block: int) -> None:
        """One more reference to a block (a prefix-cache hit)."""
        if self.ref_counts[block] == 0:
            del self._evictable[block]
        self.ref_counts[block] += 1

    def release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            if self.names[block] is not None:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def name(self, block: int, name: bytes) -> None:
        """Register a full block under ``name`` (the first block with a name keeps it)."""
        if name not in self._by_name and self.names[block] is None:
            self._by_name[name] = block
            self.names[block] = name

    def _forget(self, block: int) -> None:
        name = self.names[block]
        if name is not None and self._by_name.get(name) == block:
            del self._by_name[name]
        self.names[block] = None

    def forget_all(self) -> None:
        """Drop every name (cached blocks without references become free)."""
        for block in range(self.num_blocks):
            self.names[block] = None
        self._by_name.clear()
        self._free.extend(self._evictable)
        self._evictable.clear()

    def forget_unreferenced(self) -> None:
        """Drop the cached blocks nobody references (their contents are about to go)."""
        for block in self._evictable:
            self._forget(block)
            self._free.append(block)
        self._evictable.clear()


class BlockTable:
    """The block ids of live requests, a row each, in one int64 array ``[rows, width]``.

    Row 0 is never given out and holds ``SCRATCH_BLOCK`` throughout (padding rows of a batch
    point at it); so does every cell past a request's last block. Rows and columns grow by
    doubling when needed, which replaces the array and bumps :attr:`generation`. Each cell
    written is also queued (flat index, value) for whoever keeps a copy of the table on another
    device: :meth:`take_updates`.
    """

    def __init__(self, width: int = 8, rows: int = 8) -> None:
        self.array = np.full((rows + 1, max(1, width)), SCRATCH_BLOCK, dtype=np.int64)
        self.generation = 0
        """Bumped whenever :attr:`array` is replaced (a copy must then be taken whole)."""
        self._rows: dict[RequestId, int] = {}
        self._lengths: dict[RequestId, int] = {}
        self._free = list(range(rows, 0, -1))  # pop() hands out the lowest row first
        self._index: list[int] = []
        self._values: list[int] = []

    @property
    def width(self) -> int:
        return self.array.shape[1]

    def row(self, request_id: RequestId) -> int:
        """The request's row (0, the scratch row, for a request holding no blocks)."""
        return self._rows.get(request_id, 0)

    def append(self, request_id: RequestId, blocks: list[int]) -> None:
        """Write ``blocks`` after the request's last one, taking a row if it has none."""
        if not blocks:
            return
        row = self._rows.get(request_id)
        if row is None:
            if not self._free:
                self._grow(rows=2 * (self.array.shape[0] - 1), width=self.width)
            row = self._rows[request_id] = self._free.pop()
        start = self._lengths.get(request_id, 0)
        end = start + len(blocks)
        if end > self.width:
            self._grow(rows=self.array.shape[0] - 1, width=max(end, 2 * self.width))
        self.array[row, start:end] = blocks
        self._lengths[request_id] = end
        self._note(row * self.width + start, blocks)

    def release(self, request_id: RequestId) -> None:
        """Clear the request's row (back to scratch) and give it back."""
        row = self._rows.pop(request_id, None)
        if row is None:
            return
        n = self._lengths.pop(request_id)
        self.array[row, :n] = SCRATCH_BLOCK
        self._note(row * self.width, [SCRATCH_BLOCK] * n)
        self._free.append(row)

    def take_updates(self) -> tuple[list[int], list[int]]:
        """The cells written since the last call: flat indices into :attr:`array` and their
        values (meaningless across a change of :attr:`generation`)."""
        out = self._index, self._values
        self._index, self._values = [], []
        return out

    def _note(self, flat_start: int, values: list[int]) -> None:
        self._index.extend(range(flat_start, flat_start + len(values)))
        self._values.extend(values)

    def _grow(self, *, rows: int, width: int) -> None:
        old = self.array
        self.array = np.full((rows + 1, width), SCRATCH_BLOCK, dtype=np.int64)
        self.array[: old.shape[0], : old.shape[1]] = old
        self._free = list(range(rows, old.shape[0] - 1, -1)) + self._free
        self.generation += 1
        self._index, self._values = [], []


@dataclass
class _Blocks:
    ids: list[int]
    names: list[bytes]
    """Chained names of the request's full blocks that have been computed."""
    epoch: int
    """The cache epoch the request's KV was computed in (names are only registered then)."""


class KVCacheManager:
    """Allocates blocks to requests as their tokens are computed; shares named prefixes."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_prefix_caching: bool = True,
        max_blocks_per_request: int | None = None,
    ):
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.table = BlockTable(width=max_blocks_per_request or 8)
        """Every live request's block ids, a row each (what step batches read)."""
        self._requests: dict[RequestId, _Blocks] = {}
        self._epoch = 0
        self.prefix_hits = 0
        """Tokens served from the prefix cache so far."""

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_ever_fit(self, num_tokens: int) -> bool:
        """Whether one request of ``num_tokens`` fits in the whole cache."""
        return self.blocks_for(num_tokens) <= self.pool.num_usable

    def block_ids(self, request_id: RequestId) -> list[int]:
        entry = self._requests.get(request_id)
        return entry.ids if entry else []

    def usage(self) -> float:
        """Fraction of the usable blocks referenced by requests."""
        return self.pool.num_in_use() / self.pool.num_usable

    def match_prefix(self, request: Request) -> int:
        """Take the cached blocks that hold the start of ``request``'s tokens; returns how many
        tokens they cover (always leaving at least the last token to compute)."""
        entry = self._entry(request)
        if not self.enable_prefix_caching or entry.ids:
            return 0
        tokens, size = request.all_token_ids, self.block_size
        parent = b""
        for i in range((len(tokens) - 1) // size):
            name = block_hash(parent, tokens[i * size : (i + 1) * size])
            block = self.pool.lookup(name)
            if block is None:
                break
            self.pool.take(block)
            entry.ids.append(block)
            entry.names.append(name)
            parent = name
        self.table.append(request.request_id, entry.ids)
        cached = len(entry.ids) * size
        self.prefix_hits += cached
        return cached

    def allocate(self, request: Request, num_new_tokens: int) -> bool:
        """Make room for ``num_new_tokens`` more computed tokens; False (nothing taken) if the
        cache has too few blocks available."""
        entry = self._entry(request)
        need = self.blocks_for(request.num_computed_tokens + num_new_tokens) - len(entry.ids)
        if need <= 0:
            return True
        blocks = self.pool.allocate(need)
        if blocks is None:
            return False
        entry.ids.extend(blocks)
        self.table.append(request.request_id, blocks)
        return True

    def commit(self, request: Request) -> None:
        """Name the request's blocks that its computed tokens filled (after a step)."""
        entry = self._requests.get(request.request_id)
        if entry is None or not self.enable_prefix_caching or entry.epoch != self._epoch:
            return
        size, tokens = self.block_size, request.all_token_ids
        for i in range(len(entry.names), request.num_computed_tokens // size):
            parent = entry.names[-1] if entry.names else b""
            name = block_hash(parent, tokens[i * size : (i + 1) * size])
            self.pool.name(entry.ids[i], name)
            entry.names.append(name)

    def free(self, request: Request) -> None:
        """Release every block of ``request`` (named ones stay cached)."""
        entry = self._requests.pop(request.request_id, None)
        if entry is None:
            return
        self.table.release(request.request_id)
        # Released last block first, so a prefix's head outlives its tail in the cache.
        for block in reversed(entry.ids):
            self.pool.release(block)

    def reset_prefix_cache(self) -> None:
        """Forget every name: after new weights, no cached KV may be reused. Requests in flight
        keep their blocks but no longer name them."""
        self._epoch += 1
        self.pool.forget_all()

    def blocks_in_use(self) -> list[int]:
        """Every block some request references, ascending."""
        return [b for b in range(1, self.pool.num_blocks) if self.pool.ref_counts[b] > 0]

    def _entry(self, request: Request) -> _Blocks:
        entry = self._requests.get(request.request_id)
        if entry is None:
            entry = self._requests[request.request_id] = _Blocks([], [], self._epoch)
        return entry
