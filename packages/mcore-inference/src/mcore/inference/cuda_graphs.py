"""CUDA graphs of the paged forward, one per captured :class:`BatchDims`.

A graph is captured for each configured shape (token count, prefill requests, decode requests):
decode-only steps for 1, 2, 4, ... decode requests, and steps mixing one prefill chunk with
decodes. A step is padded to the smallest captured shape it fits (padding tokens write to the
scratch block), its inputs copied into that graph's static tensors and the graph replayed;
steps that fit none run eagerly. The graphs read the KV-cache tensors (and a hybrid model's
recurrent-state tensors; padding rows use the scratch state slot 0) at their captured addresses,
so they are dropped when the cache is freed (suspend) and captured again on resume.

Models whose forward synchronises with the host (MoE token dispatch sizes its buffers from the
routing) cannot be captured: a first forward under CUDA's sync debugging finds that before any
capture, one warning is logged and the engine stays eager.

This path needs an NVIDIA GPU and has not been run by this project's CI (no GPU there); the
``gpu``-marked tests exercise it where one is present.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import Any

import torch

from mcore.inference.context import BatchDims, DynamicInferenceContext
from mcore.models.inference import PagedBatch

log = logging.getLogger(__name__)

_INPUTS = (
    "input_ids",
    "positions",
    "slot_mapping",
    "decode_block_tables",
    "decode_context_lens",
    "prefill_block_tables",
    "prefill_query_rows",
    "prefill_query_positions",
    "logits_rows",
    "decode_state_slots",
    "prefill_state_slots",
)
"""The batch tensors copied into a graph's static inputs (the state slots: hybrid models)."""


def graph_shapes(
    max_requests: int,
    max_tokens: int | None,
    decode_sizes: Iterable[int] | None,
    prefill_tokens: Iterable[int] | None,
) -> list[BatchDims]:
    """The shapes to capture: decode-only steps and steps of one prefill chunk plus decodes."""
    budget = max_tokens or 2**31
    if decode_sizes is None:
        sizes, d = [], 1
        while d < max_requests:
            sizes.append(d)
            d *= 2
        decode_sizes = [*sizes, max_requests]
    decode_sizes = sorted({d for d in decode_sizes if d <= min(max_requests, budget)})
    if prefill_tokens is None:
        prefill_tokens = [t for t in (64, 256) if t <= budget] or [budget]
    shapes = {BatchDims(d, 0, d) for d in decode_sizes}
    for t in prefill_tokens:
        for d in [0, *decode_sizes]:
            if d + t <= budget and d + 1 <= max_requests:
                shapes.add(BatchDims(d + t, 1, d))
    return sorted(shapes)


@dataclasses.dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: PagedBatch
    logits: torch.Tensor


class CudaGraphRunner:
    """Captures the model's paged forward for a set of shapes and replays it."""

    def __init__(
        self, model: torch.nn.Module, context: DynamicInferenceContext, shapes: list[BatchDims]
    ) -> None:
        if context.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the engine runs on {context.device}")
        self.model: Any = model  # anything with forward_paged (see DynamicInferenceEngine)
        self.context = context
        self.shapes = sorted(shapes)
        self._graphs: dict[BatchDims, _Graph] = {}
        self.disabled_reason: str | None = None

    @property
    def captured(self) -> list[BatchDims]:
        return sorted(self._graphs)

    def pick(self, actual: BatchDims) -> BatchDims | None:
        """The smallest captured shape that ``actual`` fits, or None (run eagerly)."""
        fitting = [s for s in self._graphs if s.fits(actual)]
        return min(fitting, key=lambda s: (s.num_tokens, s.num_decode, s.num_prefill), default=None)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every shape (largest first, sharing one memory pool)."""
        self.release()
        if self.disabled_reason is not None:
            return
        pool = torch.cuda.graph_pool_handle()
        try:
            self._check_no_host_sync(max(self.shapes))
            for dims in sorted(self.shapes, reverse=True):
                inputs = self.context.dummy_batch(dims)
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):  # warm up kernels and allocator outside the graph
                        self.model.forward_paged(inputs)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self.model.forward_paged(inputs)
                self._graphs[dims] = _Graph(graph, inputs, logits)
        except Exception as exc:  # e.g. a host synchronisation inside the forward (MoE)
            self.release()
            self.disabled_reason = f"{type(exc).__name__}: {exc}"
            log.warning(
                "CUDA graph capture failed (%s); the engine runs eagerly", self.disabled_reason
            )
        torch.cuda.synchronize()

    def _check_no_host_sync(self, dims: BatchDims) -> None:
        """Run the forward once with CUDA's sync debugging set to fail: a forward that
        synchronises with the host (reads a device value on the CPU) cannot be captured, and
        is found here rather than by a capture that breaks halfway."""
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            self.model.forward_paged(self.context.dummy_batch(dims))
        finally:
            torch.cuda.set_sync_debug_mode(previous)

    def release(self) -> None:
        self._graphs.clear()

    def replay(self, dims: BatchDims, batch: PagedBatch) -> torch.Tensor:
        """Copy ``batch`` (built padded to ``dims``) into the graph's inputs and replay it;
        returns the graph's logits ``[num_decode + num_prefill, vocab]``."""
        entry = self._graphs[dims]
        for name in _INPUTS:
            source = getattr(batch, name)
            if source is not None:
                getattr(entry.inputs, name).copy_(source, non_blocking=True)
        entry.graph.replay()
        return entry.logits
