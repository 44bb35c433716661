"""``DynamicInferenceContext``: the paged KV-cache memory and the batch each step runs.

The context allocates one set of cache tensors per attention layer, ``num_blocks`` blocks of
``block_size`` tokens each, shaped by the model's ``kv_cache_specs()`` (keys and values for
grouped-query attention, one latent-plus-rope tensor for multi-latent attention). The
:class:`~mcore.inference.kv_cache.KVCacheManager` decides which blocks a request holds; the
context turns the scheduler's chunks into the :class:`~mcore.models.inference.PagedBatch` the
model reads, optionally padded to fixed :class:`BatchDims` for a CUDA graph.

Hybrid models' sequence-mixer layers keep a fixed-size recurrent state per request instead
(:mod:`mcore.inference.recurrent_state`): the context allocates those tensors next to the cache,
``[max_requests + 1, *shape]`` each, and a running request owns one slot of them. The batch
names each request's slot (padding rows: the scratch slot 0); slots handed out since the last
step are zeroed before the forward. Such models get no prefix caching: a cached KV prefix is
useless without the recurrent state after it.

Suspend frees the cache tensors: ``offload`` first copies the blocks in use (and the state
slots in use) to host memory (and resume copies them back to the same ids, so generation
continues bit for bit); ``recompute`` keeps nothing, the engine having sent every request back
to the queue.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mcore.inference.config import InferenceConfig
from mcore.inference.errors import InvalidRequestError
from mcore.inference.kv_cache import SCRATCH_BLOCK, KVCacheManager
from mcore.inference.recurrent_state import SCRATCH_SLOT, RecurrentStateConfig, StateSlots
from mcore.inference.scheduler import ScheduledChunk
from mcore.models.inference import KVCacheSpec, PagedBatch

log = logging.getLogger(__name__)

_Tensors = dict[int, tuple[torch.Tensor, ...]]


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
    """Paged KV-cache tensors, their block manager, and step batches built over them; for
    hybrid models also the recurrent-state tensors and their slots (``state_config``)."""

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
        state_config: RecurrentStateConfig | None = None,
    ) -> None:
        if not specs and state_config is None:
            raise ValueError("the model has no attention or sequence-mixer layers: nothing to keep")
        if state_config is not None and enable_prefix_caching:
            log.info(
                "prefix caching is off: the model keeps recurrent state (Mamba / gated delta net "
                "layers), and a cached KV prefix is useless without the state after it"
            )
            enable_prefix_caching = False
        self.specs = dict(specs)
        self.block_size = block_size
        self.max_blocks_per_request = max_blocks_per_request
        self.device = torch.device(device)
        self.dtype = dtype
        self.kv = KVCacheManager(
            num_blocks, block_size, enable_prefix_caching=enable_prefix_caching
        )
        self.state_config = state_config
        self.state_slots = None if state_config is None else StateSlots(state_config.num_slots)
        self.caches: _Tensors | None = None
        self.states: _Tensors | None = None
        """Recurrent-state tensors ``[num_slots, *shape]`` by layer (None: no such layers, or
        suspended)."""
        self._offloaded: tuple[torch.Tensor, _Tensors] | None = None
        self._offloaded_states: tuple[torch.Tensor, _Tensors] | None = None
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
        state_config: RecurrentStateConfig | None = None,
    ) -> DynamicInferenceContext:
        """As many blocks as ``config.buffer_size_gb`` holds (or ``kv_cache_blocks``), never
        more than ``max_requests`` sequences of ``max_sequence_length`` can use. The
        recurrent states (``state_config``) come out of the same buffer first."""
        bs = config.block_size_tokens
        per_request = math.ceil(max_sequence_length / bs)
        most = config.max_requests * per_request + 1
        if config.kv_cache_blocks is not None:
            num_blocks = config.kv_cache_blocks
        else:
            per_block = bytes_per_block(specs, bs, dtype)
            state_bytes = 0 if state_config is None else state_config.total_bytes()
            budget = config.buffer_size_gb * 2**30 - state_bytes
            fits = int(budget // per_block) if per_block else most
            if state_bytes and fits < 2:
                raise InvalidRequestError(
                    f"inference.buffer_size_gb ({config.buffer_size_gb}) leaves no room for the "
                    f"KV cache once the recurrent states of max_requests "
                    f"({config.max_requests}) requests take {state_bytes / 2**30:.3f} GiB: raise "
                    "buffer_size_gb or lower max_requests",
                    field="buffer_size_gb",
                )
            num_blocks = max(2, min(fits, most))
        return cls(
            specs,
            num_blocks=num_blocks,
            block_size=bs,
            max_blocks_per_request=per_request,
            device=device,
            dtype=dtype,
            enable_prefix_caching=config.enable_prefix_caching,
            state_config=state_config,
        )

    # -- memory -------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.kv.num_blocks

    @property
    def allocated(self) -> bool:
        return self.caches is not None

    def memory_bytes(self) -> int:
        """Bytes the cache and recurrent-state tensors take (0 while suspended)."""
        return self.kv_memory_bytes() + self.state_memory_bytes()

    def kv_memory_bytes(self) -> int:
        """Bytes the KV-cache tensors take (0 while suspended)."""
        return _bytes(self.caches)

    def state_memory_bytes(self) -> int:
        """Bytes the recurrent-state tensors take (0 while suspended or without them)."""
        return _bytes(self.states)

    def allocate(self) -> None:
        """(Re)create the cache tensors, zeroed so masked slots never hold NaN, and the
        recurrent-state tensors (zeroed)."""
        if self.caches is None:
            self.caches = {
                layer: tuple(
                    torch.zeros(shape, dtype=self.dtype, device=self.device)
                    for shape in spec.shapes(self.num_blocks, self.block_size)
                )
                for layer, spec in self.specs.items()
            }
        if self.state_config is not None and self.states is None:
            self.states = self.state_config.allocate(self.device)

    def suspend(self, *, offload: bool) -> None:
        """Free the cache and state tensors; with ``offload``, keep a host copy of the blocks
        and state slots in use."""
        if self.caches is None:
            return
        self._offloaded_states = None
        if offload and self.states is not None:
            used = torch.tensor(self.state_slots.in_use(), dtype=torch.long)
            index = used.to(self.device)
            self._offloaded_states = (
                used,
                {
                    layer: tuple(t.index_select(0, index).to("cpu") for t in tensors)
                    for layer, tensors in self.states.items()
                },
            )
        self.states = None
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
        """Reallocate the cache and state tensors and restore offloaded blocks and state
        slots to their ids."""
        self.allocate()
        restore = ((self._offloaded, self.caches), (self._offloaded_states, self.states))
        for saved, tensors in restore:
            if saved is None:
                continue
            used, copies = saved
            index = used.to(self.device)
            for layer, host in copies.items():
                for target, rows in zip(tensors[layer], host, strict=True):
                    target.index_copy_(0, index, rows.to(self.device))
        self._offloaded = self._offloaded_states = None

    def _zero_new_slots(self) -> None:
        """Zero the state slots handed out since the last step (one fill per tensor)."""
        slots = sorted(set(self.state_slots.take_to_zero()))
        if not slots:
            return
        index = torch.tensor(slots, dtype=torch.long).to(self.device, non_blocking=True)
        for tensors in self.states.values():
            for t in tensors:
                t.index_fill_(0, index, 0)

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
        if self.states is not None:
            self._zero_new_slots()
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
        decode_state = np.full(D, SCRATCH_SLOT, dtype=np.int64)
        prefill_state = np.full(P, SCRATCH_SLOT, dtype=np.int64)

        last_row: list[int] = []  # the last row of each chunk, in row order
        for j, chunk in enumerate(decode):
            blocks = self._fill(chunk, j, ids, positions, slots)
            decode_tables[j, : len(blocks)] = blocks
            decode_lens[j] = chunk.start + 1
            decode_state[j] = self._state_slot(chunk)
            last_row.append(j)
        row = D
        for j, chunk in enumerate(prefill):
            blocks = self._fill(chunk, row, ids, positions, slots)
            n = chunk.num_tokens
            prefill_tables[j, : len(blocks)] = blocks
            query_rows[j, :n] = np.arange(row, row + n)
            query_positions[j, :n] = positions[row : row + n]
            prefill_state[j] = self._state_slot(chunk)
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
        if self.states is not None:
            paged.decode_state_slots = tensor(decode_state)
            paged.prefill_state_slots = tensor(prefill_state)
            paged.states = self.states
        return StepBatch(paged, dims, sample_chunks, sample_rows)

    def dummy_batch(self, dims: BatchDims) -> PagedBatch:
        """A batch of shape ``dims`` whose every token is padding (for graph capture)."""
        bs = self.block_size
        T, P, D = dims.num_tokens, dims.num_prefill, dims.num_decode
        width, query_len = self.max_blocks_per_request, T - D

        def zeros(*shape: int, fill: int = 0) -> torch.Tensor:
            return torch.full(shape, fill, dtype=torch.long, device=self.device)

        query_rows = zeros(P, query_len, fill=T)
        batch = PagedBatch(
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
        if self.states is not None:
            batch.decode_state_slots = zeros(D, fill=SCRATCH_SLOT)
            batch.prefill_state_slots = zeros(P, fill=SCRATCH_SLOT)
            batch.states = self.states
        return batch

    def _state_slot(self, chunk: ScheduledChunk) -> int:
        if self.state_slots is None:
            return SCRATCH_SLOT
        return self.state_slots.slot(chunk.request.request_id)

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


def _bytes(tensors: _Tensors | None) -> int:
    if tensors is None:
        return 0
    return sum(t.numel() * t.element_size() for ts in tensors.values() for t in ts)


def bytes_per_block(specs: Mapping[int, KVCacheSpec], block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes over all layers."""
    per_token = sum(spec.elements_per_token() for spec in specs.values())
    return per_token * block_size * _dtype_size(dtype)
