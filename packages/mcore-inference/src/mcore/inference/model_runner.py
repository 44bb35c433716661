"""The model runner: one step's chunks in, the logits of the requests that sample out.

It builds the step's batch through the context, replays a CUDA graph when one was captured for
a shape the step fits, and otherwise runs the model's paged forward eagerly. The linear layers
run what ``inference.linear_backend`` names (on a CPU in fp32 by default, weights prepacked for
oneDNN: :mod:`mcore.inference.packed_linears`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mcore.inference.config import InferenceConfig
from mcore.inference.context import BatchDims, DynamicInferenceContext
from mcore.inference.cuda_graphs import CudaGraphRunner, graph_shapes
from mcore.inference.errors import InvalidRequestError
from mcore.inference.packed_linears import packing_available
from mcore.inference.pipeline import PipelineStages
from mcore.inference.scheduler import ScheduledChunk
from mcore.parallel.tensor_parallel import LinearBackend, apply_linear_backend


class ModelRunner:
    """Runs ``model.forward_paged`` over the context's KV cache."""

    def __init__(
        self,
        model: torch.nn.Module,
        context: DynamicInferenceContext,
        config: InferenceConfig,
        *,
        stages: PipelineStages | None = None,
    ) -> None:
        self.model: Any = model  # anything with forward_paged (see DynamicInferenceEngine)
        self.context = context
        self.stages = stages
        """This rank's pipeline stage (None: the whole model here): hidden states come from
        the previous stage and go to the next; only the last returns logits."""
        self.graphs: CudaGraphRunner | None = None
        self.linear_backend = _linear_backend_name(config, context)
        """The ``linear_backend`` the linear layers run (``inference.linear_backend``)."""
        self.packed_linears = apply_linear_backend(model, _linear_backend(self.linear_backend))
        """Linear layers given a kernel by the backend (the others run ``F.linear``)."""
        if config.enable_cuda_graph and context.device.type == "cuda" and stages is None:
            shapes = graph_shapes(
                config.max_requests,
                config.max_tokens,
                config.cuda_graph_decode_sizes,
                config.cuda_graph_prefill_tokens,
            )
            self.graphs = CudaGraphRunner(model, context, shapes)
            self.graphs.capture()
        self.graph_steps = 0
        self.eager_steps = 0

    @torch.inference_mode()
    def execute(self, chunks: Sequence[ScheduledChunk]) -> tuple[torch.Tensor | None, list]:
        """``(logits [S, vocab], chunks)``: one row per chunk that samples, in that order
        (``None`` logits on a pipeline stage before the last)."""
        dims = None
        if self.graphs is not None:
            decode = sum(1 for c in chunks if c.num_tokens == 1)
            actual = BatchDims(sum(c.num_tokens for c in chunks), len(chunks) - decode, decode)
            dims = self.graphs.pick(actual)
        batch = self.context.build_batch(chunks, dims)
        if dims is not None:
            assert self.graphs is not None  # dims are the captured graphs' shapes
            logits = self.graphs.replay(dims, batch.paged)
            self.graph_steps += 1
        elif self.stages is not None:
            logits = self.stages.forward(self.model, batch.paged)
            self.eager_steps += 1
            if logits is None:  # a stage before the last: nothing to sample here
                return None, batch.sample_chunks
        else:
            logits = self.model.forward_paged(batch.paged)
            self.eager_steps += 1
        if batch.sample_rows is not None:
            logits = logits.index_select(0, batch.sample_rows)
        return logits, batch.sample_chunks

    @torch.inference_mode()
    def execute_with_hidden(self, chunks: Sequence[ScheduledChunk]):
        """Eagerly: ``(logits, batch, hidden)``: the logits rows of ``batch.sample_chunks``
        (``num_logits`` rows each), the batch, and every row's final-normed hidden states
        ``[T, 1, h]``, which the multi-token-prediction depths read (speculative decoding)."""
        batch = self.context.build_batch(chunks)
        logits, hidden = self.model.forward_paged(batch.paged, return_hidden=True)
        self.eager_steps += 1
        return logits, batch, hidden

    @torch.inference_mode()
    def execute_mtp(self, paged, hidden: torch.Tensor, depth: int, *, first: bool = True):
        """Eagerly: multi-token-prediction depth ``depth`` over the paged batch ``paged``
        (its ids are the shifted tokens; ``hidden`` the previous depth's rows in its order):
        ``(logits of paged.logits_rows, hidden of this depth)``. ``first``: the batch is new
        (later depths over the same batch reuse its attention masks)."""
        hidden, logits = self.model.mtp_forward_paged(paged, hidden, depth, new_batch=first)
        return logits, hidden

    def release_graphs(self) -> None:
        if self.graphs is not None:
            self.graphs.release()

    def recapture_graphs(self) -> None:
        if self.graphs is not None:
            self.graphs.capture()


def _linear_backend_name(config: InferenceConfig, context: DynamicInferenceContext) -> str:
    if config.linear_backend != "auto":
        return config.linear_backend
    cpu_fp32 = context.device.type == "cpu" and context.dtype == torch.float32
    return "onednn_packed" if cpu_fp32 and packing_available() else "torch"


def _linear_backend(name: str) -> LinearBackend:
    """The ``linear_backend`` registry entry ``name``; an unknown one names the knob."""
    from mcore.core import UnknownComponentError, get_registry

    try:
        return get_registry("linear_backend").get(name)
    except UnknownComponentError as error:
        raise InvalidRequestError(
            f"inference.linear_backend: {error}", field="linear_backend"
        ) from None
