"""The model runner: one step's chunks in, the logits of the requests that sample out.

It builds the step's batch through the context, replays a CUDA graph when one was captured for
a shape the step fits, and otherwise runs the model's paged forward eagerly. On a CPU in fp32
the linear layers run on weights prepacked for oneDNN (:mod:`mcore.inference.packed_linears`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mcore.inference.config import InferenceConfig
from mcore.inference.context import BatchDims, DynamicInferenceContext
from mcore.inference.cuda_graphs import CudaGraphRunner, graph_shapes
from mcore.inference.packed_linears import pack_linears
from mcore.inference.pipeline import PipelineStages
from mcore.inference.scheduler import ScheduledChunk


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
        self.model = model
        self.context = context
        self.stages = stages
        """This rank's pipeline stage (None: the whole model here): hidden states come from
        the previous stage and go to the next; only the last returns logits."""
        self.graphs: CudaGraphRunner | None = None
        self.packed_linears = 0
        """Linear layers running on oneDNN-packed weights (CPU, fp32)."""
        if context.device.type == "cpu" and context.dtype == torch.float32:
            self.packed_linears = pack_linears(model)
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
    def execute(self, chunks: Sequence[ScheduledChunk]) -> tuple[torch.Tensor, list]:
        """``(logits [S, vocab], chunks)``: one row per chunk that samples, in that order."""
        dims = None
        if self.graphs is not None:
            decode = sum(1 for c in chunks if c.num_tokens == 1)
            actual = BatchDims(sum(c.num_tokens for c in chunks), len(chunks) - decode, decode)
            dims = self.graphs.pick(actual)
        batch = self.context.build_batch(chunks, dims)
        if dims is not None:
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
