"""``DynamicInferenceContext``: the paged KV-cache memory and the batch each step runs.

The context allocates one set of cache tensors per attention layer, ``num_blocks`` blocks of
``block_size`` tokens each, shaped by the model's ``kv_cache_specs()`` (keys and values for
grouped-query attention, one latent-plus-rope tensor for multi-latent attention). The
:class:`~mcore.inference.kv_cache.KVCacheManager` decides which blocks a request holds; the
context turns the scheduler's chunks into the :class:`~mcore.models.inference.PagedBatch` the
model reads, optionally padded to fixed :class:`BatchDims` for a CUDA graph. Block tables are
rows of the manager's persistent block table, so building a decode step costs the host the
same however long the requests are; many decodes of mixed lengths are split into runs of
similar length that each gather only as many blocks as their longest needs.

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

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from mcore.inference.config import InferenceConfig
from mcore.inference.errors import InvalidRequestError
from mcore.inference.kv_cache import SCRATCH_BLOCK, KVCacheManager
from mcore.inference.recurrent_state import SCRATCH_SLOT, RecurrentStateConfig, StateSlots
from mcore.inference.scheduler import ScheduledChunk
from mcore.models.inference import KVCacheSpec, PagedBatch

log = logging.getLogger(__name__)

_DECODE_RUNS = 4
_DECODE_RUN_ROWS = 8

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
    """The chunks with logits rows (those that sample a token), in the order of the rows;
    each has ``num_logits`` consecutive rows."""
    sample_rows: torch.Tensor | None
    """Rows of the forward's logits for ``sample_chunks``; None: all rows, in order."""
    first_rows: dict[int, int] = field(default_factory=dict)
    """The row of each chunk's first token in the flat batch, by ``id(chunk)``."""


@dataclass
class _HostBatch:
    """A step's token rows as host arrays, before they go to the device."""

    ids: np.ndarray
    positions: np.ndarray
    slots: np.ndarray
    """Where each token's key/value is written: ``block * block_size + offset``."""
    rows: np.ndarray
    """Each request's row of the block table (decode slots, then prefill slots)."""
    state_slots: np.ndarray
    """Each request's recurrent-state slot, in the same order (scratch without state)."""
    query_rows: np.ndarray
    query_positions: np.ndarray
    last_rows: list[int]
    """The last row of each chunk, decodes then prefills."""


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
            num_blocks,
            block_size,
            enable_prefix_caching=enable_prefix_caching,
            max_blocks_per_request=max_blocks_per_request,
        )
        self._table: torch.Tensor | None = None
        """The block table on the device (see :meth:`_device_table`)."""
        self._table_generation = -1
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
            assert self.state_slots is not None  # states come with their slots
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
            assert tensors is not None  # allocate() made what was saved before
            index = used.to(self.device)
            for layer, host in copies.items():
                for target, rows in zip(tensors[layer], host, strict=True):
                    target.index_copy_(0, index, rows.to(self.device))
        self._offloaded = self._offloaded_states = None

    def _zero_new_slots(self) -> None:
        """Zero the state slots handed out since the last step (one fill per tensor)."""
        assert self.state_slots is not None and self.states is not None  # a hybrid model's
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

        Host work per decode request is a few scalars (its table row, position and last
        token); block tables are rows of the KV manager's persistent :class:`BlockTable`,
        selected on the device, so a decode step costs the same however long the requests.
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
        elif not dims.fits(actual):
            raise ValueError(f"a step of shape {actual} does not fit the padded shape {dims}")
        host = self._host_batch(decode, prefill, dims, padded)

        def tensor(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(array).to(self.device, non_blocking=True)

        D, bs = dims.num_decode, self.block_size
        decode_runs: tuple[tuple[torch.Tensor, int], ...] = ()
        if padded:
            decode_width = prefill_width = self.max_blocks_per_request
        else:
            blocks = host.positions[: len(decode)] // bs + 1
            decode_width = int(blocks.max()) if decode else 1
            decode_runs = tuple(
                (tensor(rows), width) for rows, width in self._decode_runs(blocks, decode_width)
            )
            prefill_width = max(
                ((c.start + c.num_tokens - 1) // bs + 1 for c in prefill), default=1
            )
        ordered = [*decode, *prefill]
        logits_rows, sample_rows = self._logits_rows(ordered, host.last_rows, dims, padded)

        table = self._device_table()
        request_rows = tensor(host.rows)
        paged = PagedBatch(
            input_ids=tensor(host.ids),
            positions=tensor(host.positions),
            slot_mapping=tensor(host.slots),
            block_size=bs,
            num_decode=D,
            decode_block_tables=table[:, :decode_width].index_select(0, request_rows[:D]),
            decode_context_lens=tensor(host.positions[:D] + 1),
            num_prefill=dims.num_prefill,
            prefill_block_tables=table[:, :prefill_width].index_select(0, request_rows[D:]),
            prefill_query_rows=tensor(host.query_rows),
            prefill_query_positions=tensor(host.query_positions),
            logits_rows=tensor(np.asarray(logits_rows, dtype=np.int64)),
            decode_runs=decode_runs,
            caches=self.caches,
        )
        if self.states is not None:
            paged.decode_state_slots = tensor(host.state_slots[:D])
            paged.prefill_state_slots = tensor(host.state_slots[D:])
            paged.states = self.states
        sample_chunks = [c for c in ordered if c.num_logits]
        first_rows = {
            id(c): last - c.num_tokens + 1 for c, last in zip(ordered, host.last_rows, strict=True)
        }
        return StepBatch(paged, dims, sample_chunks, sample_rows, first_rows)

    def _host_batch(
        self,
        decode: list[ScheduledChunk],
        prefill: list[ScheduledChunk],
        dims: BatchDims,
        padded: bool,
    ) -> _HostBatch:
        """The step's token rows on the host: decodes at ``[0, num_decode)``, each prefill
        chunk after them, padding (scratch row, scratch slot) wherever no chunk is."""
        T, P, D, bs = dims.num_tokens, dims.num_prefill, dims.num_decode, self.block_size
        table = self.kv.table
        ids = np.zeros(T, dtype=np.int64)
        positions = np.zeros(T, dtype=np.int64)
        rows = np.zeros(D + P, dtype=np.int64)  # table row per request; padding: scratch row 0
        nd = len(decode)
        state_slots = np.full(D + P, SCRATCH_SLOT, dtype=np.int64)  # recurrent state, if any
        if nd:
            rows[:nd] = [table.row(c.request.request_id) for c in decode]
            positions[:nd] = [c.start for c in decode]
            ids[:nd] = [
                c.request.all_token_ids[c.start] if c.token_ids is None else c.token_ids[0]
                for c in decode
            ]
            if self.states is not None:
                state_slots[:nd] = [self._state_slot(c) for c in decode]
        query_len = T - D if padded else max((c.num_tokens for c in prefill), default=0)
        query_rows = np.full((P, query_len), T, dtype=np.int64)
        query_positions = np.zeros((P, query_len), dtype=np.int64)
        token_rows = np.zeros(T, dtype=np.int64)  # each token's table row
        token_rows[:nd] = rows[:nd]
        last_rows = list(range(nd))
        row = D
        for j, chunk in enumerate(prefill):
            start, n = chunk.start, chunk.num_tokens
            rows[D + j] = token_rows[row : row + n] = table.row(chunk.request.request_id)
            state_slots[D + j] = self._state_slot(chunk)
            ids[row : row + n] = chunk.ids()
            positions[row : row + n] = query_positions[j, :n] = np.arange(start, start + n)
            query_rows[j, :n] = np.arange(row, row + n)
            row += n
            last_rows.append(row - 1)
        slots = table.array[token_rows, positions // bs] * bs + positions % bs
        slots[nd:D] = slots[row:] = SCRATCH_BLOCK * bs  # padding tokens write to scratch
        return _HostBatch(
            ids, positions, slots, rows, state_slots, query_rows, query_positions, last_rows
        )

    @staticmethod
    def _decode_runs(blocks: np.ndarray, width: int) -> list[tuple[np.ndarray, int]]:
        """The decode rows split by length, ``(rows, width)`` each, the longest first: up to
        ``_DECODE_RUNS`` runs of at least ``_DECODE_RUN_ROWS`` rows, each attending over its
        own block-table width. A mixed-length batch then gathers about a third less padding,
        for a few more small ops per layer. Empty: one run is all there is."""
        count = min(_DECODE_RUNS, len(blocks) // _DECODE_RUN_ROWS)
        if count < 2 or int(blocks.min()) == width:
            return []
        order = np.argsort(-blocks, kind="stable")
        bounds = [len(blocks) * i // count for i in range(count + 1)]
        runs: list[tuple[np.ndarray, int]] = []
        for first, end in itertools.pairwise(bounds):
            rows, run_width = order[first:end], int(blocks[order[first]])
            if runs and runs[-1][1] == run_width:  # no narrower: join the previous run
                runs[-1] = (np.concatenate([runs[-1][0], rows]), run_width)
            else:
                runs.append((rows, run_width))
        return runs if len(runs) > 1 else []

    def _logits_rows(
        self,
        ordered: list[ScheduledChunk],
        last_rows: list[int],
        dims: BatchDims,
        padded: bool,
    ) -> tuple[list[int], torch.Tensor | None]:
        """The rows the forward returns logits for, and (padded) which of them sample."""
        if not padded:
            rows = []
            for last, chunk in zip(last_rows, ordered, strict=True):
                rows += range(last - chunk.num_logits + 1, last + 1)
            return rows, None
        # Static shape: a row for every decode slot and every prefill slot.
        D, P = dims.num_decode, dims.num_prefill
        nd = len(ordered) - sum(1 for c in ordered if c.num_tokens > 1)
        logits_rows = list(range(D)) + [
            last_rows[nd + j] if nd + j < len(ordered) else 0 for j in range(P)
        ]
        slot_of_chunk = list(range(nd)) + [D + j for j in range(len(ordered) - nd)]
        sample_rows = torch.tensor(
            [s for s, c in zip(slot_of_chunk, ordered, strict=True) if c.samples],
            dtype=torch.long,
            device=self.device,
        )
        return logits_rows, sample_rows

    def _device_table(self) -> torch.Tensor:
        """The KV manager's block table on the engine's device, brought up to date: on a CPU
        the array itself, elsewhere a copy patched with the cells written since last step."""
        table = self.kv.table
        index, values = table.take_updates()
        if self._table is None or self._table_generation != table.generation:
            self._table = torch.from_numpy(table.array).to(self.device)
            self._table_generation = table.generation
        elif index and self.device.type != "cpu":
            cells = torch.tensor([index, values], dtype=torch.long)
            cells = cells.to(self.device, non_blocking=True)
            self._table.view(-1).index_copy_(0, cells[0], cells[1])
        return self._table

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


def _bytes(tensors: _Tensors | None) -> int:
    if tensors is None:
        return 0
    return sum(t.numel() * t.element_size() for ts in tensors.values() for t in ts)


def bytes_per_block(specs: Mapping[int, KVCacheSpec], block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes over all layers."""
    per_token = sum(spec.elements_per_token() for spec in specs.values())
    return per_token * block_size * _dtype_size(dtype)
