"""``DynamicInferenceContext``: the paged KV-cache memory and the batch each step runs.

The context allocates one set of cache tensors per attention layer, ``num_blocks`` blocks of
``block_size`` tokens each, shaped by the model's ``kv_cache_specs()`` (keys and values for
grouped-query attention, one latent-plus-rope tensor for multi-latent attention). The
:class:`~mcore.inference.kv_cache.KVCacheManager` decides which blocks a request holds; the
context turns the scheduler's chunks into the :class:`~mcore.models.inference.PagedBatch` the
model reads, optionally padded to fixed :class:`BatchDims` for a CUDA graph.

Suspend frees the cache tensors: ``offload`` first copies the blocks in use to host memory (and
resume copies them back to the same block ids, so generation continues bit for bit);
``recompute`` keeps nothing, the engine having sent every request back to the queue.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mcore.inference.config import InferenceConfig
from mcore.inference.kv_cache import SCRATCH_BLOCK, KVCacheManager
from mcore.inference.scheduler import ScheduledChunk
from mcore.models.inference import KVCacheSpec, PagedBatch


@dataclass(frozen=True, order=True)
class BatchDims:
    """The shape of a step: what a CUDA graph is captured for, and what a step is padded to."""

    num_tokens: int
    num_prefill: int
    num_decode: int

    def fits(self, other: BatchDims) -> bool:
        """Whether a step of shape ``other`` can be padded to this one."""
        return (
            other.num_decode <= self.num_decode
            and other.num_prefill <= self.num_prefill
            and other.num_tokens - other.num_decode <= self.num_tokens - self.num_decode
        )


@dataclass
class StepBatch:
    """The model input of one step and which rows of its logits to sample."""

    paged: PagedBatch
    dims: BatchDims
    sample_chunks: list[ScheduledChunk]
    """The chunks that sample a token, in the order of ``sample_rows``."""
    sample_rows: torch.Tensor | None
    """Rows of the forward's logits for ``sample_chunks``; None: all rows, in order."""


def _dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class DynamicInferenceContext:
    """Paged KV-cache tensors, their block manager, and step batches built over them."""

    def __init__(
        self,
        specs: Mapping[int, KVCacheSpec],
        *,
        num_blocks: int,
        block_size: int,
        max_blocks_per_request: int,
        device: torch.device | str,
        dtype: torch.dtype,
        enable_prefix_caching: bool = True,
    ) -> None:
        if not specs:
            raise ValueError("the model has no attention layers: nothing to cache")
        self.specs = dict(specs)
        self.block_size = block_size
        self.max_blocks_per_request = max_blocks_per_request
        self.device = torch.device(device)
        self.dtype = dtype
        self.kv = KVCacheManager(
            num_blocks, block_size, enable_prefix_caching=enable_prefix_caching
        )
        self.caches: dict[int, tuple[torch.Tensor, ...]] | None = None
        self._offloaded: tuple[torch.Tensor, dict[int, tuple[torch.Tensor, ...]]] | None = None
        self.allocate()

    @classmethod
    def from_config(
        cls,
        specs: Mapping[int, KVCacheSpec],
        config: InferenceConfig,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        max_sequence_length: int,
    ) -> DynamicInferenceContext:
        """As many blocks as ``config.buffer_size_gb`` holds (or ``kv_cache_blocks``), never
        more than ``max_requests`` sequences of ``max_sequence_length`` can use."""
        bs = config.block_size_tokens
        per_request = math.ceil(max_sequence_length / bs)
        if config.kv_cache_blocks is not None:
            num_blocks = config.kv_cache_blocks
        else:
            per_block = bytes_per_block(specs, bs, dtype)
            fits = int(config.buffer_size_gb * 2**30 // per_block)
            num_blocks = max(2, min(fits, config.max_requests * per_request + 1))
        return cls(
            specs,
            num_blocks=num_blocks,
            block_size=bs,
            max_blocks_per_request=per_request,
            device=device,
            dtype=dtype,
            enable_prefix_caching=config.enable_prefix_caching,
        )

    # -- memory -------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.kv.num_blocks

    @property
    def allocated(self) -> bool:
        return self.caches is not None

    def memory_bytes(self) -> int:
        """Bytes the cache tensors take (0 while suspended)."""
        if self.caches is None:
            return 0
        return sum(t.numel() * t.element_size() for ts in self.caches.values() for t in ts)

    def allocate(self) -> None:
        """(Re)create the cache tensors, zeroed so masked slots never hold NaN."""
        if self.caches is not None:
            return
        self.caches = {
            layer: tuple(
                torch.zeros(shape, dtype=self.dtype, device=self.device)
                for shape in spec.shapes(self.num_blocks, self.block_size)
            )
            for layer, spec in self.specs.items()
        }

    def suspend(self, *, offload: bool) -> None:
        """Free the cache tensors; with ``offload``, keep a host copy of the blocks in use."""
        if self.caches is None:
            return
        if offload:
            used = torch.tensor(self.kv.blocks_in_use(), dtype=torch.long)
            index = used.to(self.device)
            self._offloaded = (
                used,
                {
                    layer: tuple(t.index_select(0, index).to("cpu") for t in tensors)
                    for layer, tensors in self.caches.items()
                },
            )
            # Cached blocks nobody references are not copied: forget them.
            self.kv.pool.forget_unreferenced()
        else:
            self._offloaded = None
        self.caches = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def resume(self) -> None:
        """Reallocate the cache tensors and restore offloaded blocks to their ids."""
        self.allocate()
        if self._offloaded is None:
            return
        used, saved = self._offloaded
        index = used.to(self.device)
        for layer, tensors in saved.items():
            for target, blocks in zip(self.caches[layer], tensors, strict=True):
                target.index_copy_(0, index, blocks.to(self.device))
        self._offloaded = None

    # -- batches ------------------------------------------------------------------------------

    def build_batch(
        self, chunks: Sequence[ScheduledChunk], dims: BatchDims | None = None
    ) -> StepBatch:
        """The paged batch of ``chunks``: decodes (one token) first, then prefill chunks.

        With ``dims``, the batch is padded to exactly that shape (a CUDA graph's), and the
        logits rows cover every request slot; otherwise only chunks that sample get a row.
        """
        if self.caches is None:
            raise RuntimeError("the KV cache is suspended: resume() before building batches")
        decode = [c for c in chunks if c.num_tokens == 1]
        prefill = [c for c in chunks if c.num_tokens > 1]
        actual = BatchDims(sum(c.num_tokens for c in chunks), len(prefill), len(decode))
        padded = dims is not None
        if dims is None:
            dims = actual
            query_len = max((c.num_tokens for c in prefill), default=0)
            decode_width = self._width(decode)
            prefill_width = self._width(prefill)
        else:
            if not dims.fits(actual):
                raise ValueError(f"a step of shape {actual} does not fit the padded shape {dims}")
            query_len = dims.num_tokens - dims.num_decode
            decode_width = prefill_width = self.max_blocks_per_request
        T, P, D, bs = dims.num_tokens, dims.num_prefill, dims.num_decode, self.block_size

        ids = np.zeros(T, dtype=np.int64)
        positions = np.zeros(T, dtype=np.int64)
        slots = np.full(T, SCRATCH_BLOCK * bs, dtype=np.int64)
        decode_tables = np.full((D, decode_width), SCRATCH_BLOCK, dtype=np.int64)
        decode_lens = np.ones(D, dtype=np.int64)
        prefill_tables = np.full((P, prefill_width), SCRATCH_BLOCK, dtype=np.int64)
        query_rows = np.full((P, query_len), T, dtype=np.int64)
        query_positions = np.zeros((P, query_len), dtype=np.int64)

        last_row: list[int] = []  # the last row of each chunk, in row order
        for j, chunk in enumerate(decode):
            blocks = self._fill(chunk, j, ids, positions, slots)
            decode_tables[j, : len(blocks)] = blocks
            decode_lens[j] = chunk.start + 1
            last_row.append(j)
        row = D
        for j, chunk in enumerate(prefill):
            blocks = self._fill(chunk, row, ids, positions, slots)
            n = chunk.num_tokens
            prefill_tables[j, : len(blocks)] = blocks
            query_rows[j, :n] = np.arange(row, row + n)
            query_positions[j, :n] = positions[row : row + n]
            row += n
            last_row.append(row - 1)

        ordered = [*decode, *prefill]
        sample_chunks = [c for c in ordered if c.samples]
        if not padded:
            logits_rows = [r for r, c in zip(last_row, ordered, strict=True) if c.samples]
            sample_rows = None
        else:
            # Static shape: a row for every decode slot and every prefill slot.
            slot_rows = list(range(D)) + [
                last_row[len(decode) + j] if j < len(prefill) else 0 for j in range(P)
            ]
            logits_rows = slot_rows
            slot_of_chunk = list(range(len(decode))) + [D + j for j in range(len(prefill))]
            sample_rows = torch.tensor(
                [s for s, c in zip(slot_of_chunk, ordered, strict=True) if c.samples],
                dtype=torch.long,
                device=self.device,
            )

        def tensor(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(array).to(self.device, non_blocking=True)

        paged = PagedBatch(
            input_ids=tensor(ids),
            positions=tensor(positions),
            slot_mapping=tensor(slots),
            block_size=bs,
            num_decode=D,
            decode_block_tables=tensor(decode_tables),
            decode_context_lens=tensor(decode_lens),
            num_prefill=P,
            prefill_block_tables=tensor(prefill_tables),
            prefill_query_rows=tensor(query_rows),
            prefill_query_positions=tensor(query_positions),
            logits_rows=tensor(np.asarray(logits_rows, dtype=np.int64)),
            caches=self.caches,
        )
        return StepBatch(paged, dims, sample_chunks, sample_rows)

    def dummy_batch(self, dims: BatchDims) -> PagedBatch:
        """A batch of shape ``dims`` whose every token is padding (for graph capture)."""
        bs = self.block_size
        T, P, D = dims.num_tokens, dims.num_prefill, dims.num_decode
        width, query_len = self.max_blocks_per_request, T - D

        def zeros(*shape: int, fill: int = 0) -> torch.Tensor:
            return torch.full(shape, fill, dtype=torch.long, device=self.device)

        query_rows = zeros(P, query_len, fill=T)
        return PagedBatch(
            input_ids=zeros(T),
            positions=zeros(T),
            slot_mapping=zeros(T, fill=SCRATCH_BLOCK * bs),
            block_size=bs,
            num_decode=D,
            decode_block_tables=zeros(D, width, fill=SCRATCH_BLOCK),
            decode_context_lens=zeros(D, fill=1),
            num_prefill=P,
            prefill_block_tables=zeros(P, width, fill=SCRATCH_BLOCK),
            prefill_query_rows=query_rows,
            prefill_query_positions=zeros(P, query_len),
            logits_rows=zeros(D + P),
            caches=self.caches or {},
        )

    def _width(self, chunks: Sequence[ScheduledChunk]) -> int:
        return max((len(self.kv.block_ids(c.request.request_id)) for c in chunks), default=1)

    def _fill(
        self,
        chunk: ScheduledChunk,
        row: int,
        ids: np.ndarray,
        positions: np.ndarray,
        slots: np.ndarray,
    ) -> list[int]:
        """Write one chunk's tokens, positions and cache slots at ``row``; returns its blocks."""
        request, start, n = chunk.request, chunk.start, chunk.num_tokens
        blocks = self.kv.block_ids(request.request_id)
        pos = np.arange(start, start + n)
        ids[row : row + n] = request.all_token_ids[start : start + n]
        positions[row : row + n] = pos
        slots[row : row + n] = np.asarray(blocks, dtype=np.int64)[pos // self.block_size] * (
            self.block_size
        ) + (pos % self.block_size)
        return blocks


def bytes_per_block(specs: Mapping[int, KVCacheSpec], block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes over all layers."""
    per_token = sum(spec.elements_per_token() for spec in specs.values())
    return per_token * block_size * _dtype_size(dtype)
