"""``ExpertParallelEngine``: engines whose MoE layers share experts over an expert-parallel group.

Each rank of the group is an engine of its own with its own requests (attention and dense
layers are data parallel: a whole copy on every rank), while each MoE layer holds
``num_experts / ep`` experts and sends tokens to the ranks that hold their experts (the
dispatcher's all-to-all over the group). Those collectives need every rank of the group in
every step, so the ranks step together:

- each step starts with one all-reduce (MAX) of the tokens each rank scheduled: the group's
  batch size, which says whether anyone has work (0: nobody steps);
- a rank with nothing scheduled (no requests, paused, suspended) still joins the step with an
  empty batch: it runs only its MoE layers' collectives, on zero tokens, in layer order, so
  the others' all-to-alls never wait for it. Nothing touches its KV cache, so this works
  while it is suspended;
- a driver (``AsyncInferenceEngine``) calls :meth:`idle` while its engine has nothing to do:
  that is where an idle rank meets the group, so its poll is short (``idle_poll_s``).

A rank that dies breaks the next collective; the others then raise ``EngineLostError`` (their
expert shards are gone with it) and every request of the group fails. Another group (with
``inference.data_parallel_size`` a multiple of ``expert_model_parallel_size``) keeps serving.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from mcore.inference.config import InferenceConfig
from mcore.inference.engine import DynamicInferenceEngine
from mcore.inference.errors import EngineLostError, InvalidRequestError
from mcore.inference.request import RequestDelta, RequestOutput
from mcore.inference.sampling import SamplingParams


class ExpertGroupLostError(EngineLostError):
    """A rank of the expert-parallel group is gone: its experts with it."""


class ExpertParallelEngine(DynamicInferenceEngine):
    """A :class:`DynamicInferenceEngine` over a model whose experts are split over the
    expert-parallel group of its ``parallel_state`` (see the module docstring)."""

    idle_poll_s = 0.02

    def __init__(
        self, model: torch.nn.Module, config: InferenceConfig | None = None, **kwargs: Any
    ) -> None:
        ps = getattr(model, "parallel_state", None)
        if ps is None or ps.ep_size == 1:
            raise InvalidRequestError(
                "ExpertParallelEngine needs a model built with expert parallelism "
                "(ParallelState(ep=N), inference.expert_model_parallel_size > 1)",
                field="expert_model_parallel_size",
            )
        if ps.tp_size > 1 or ps.pp_size > 1:
            raise InvalidRequestError(
                f"expert-parallel engines run with tensor_model_parallel_size 1 and "
                f"pipeline_model_parallel_size 1 for now (got {ps.tp_size} and {ps.pp_size})",
                field="expert_model_parallel_size",
            )
        if config is not None and config.enable_cuda_graph:
            raise InvalidRequestError(
                "expert-parallel engines do not capture CUDA graphs yet: set "
                "inference.enable_cuda_graph = false",
                field="enable_cuda_graph",
            )
        super().__init__(model, config, **kwargs)
        self.group = ps.ep_group
        self._moe_layers = [
            layer.mlp for layer in self.model.layers.values() if hasattr(layer.mlp, "router")
        ]
        if not self._moe_layers:
            raise InvalidRequestError(
                f"inference.expert_model_parallel_size = {ps.ep_size}, but the model has no "
                "MoE layers to split over expert-parallel ranks",
                field="expert_model_parallel_size",
            )
        self._hidden = self.model.config.hidden_size
        self._count_device = "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"
        self.group_tokens = 0
        """The group's largest batch (tokens) of the last step: 0 when nobody had work."""
        self.empty_steps = 0
        """Steps this rank joined with an empty batch."""
        self._closed = False
        self._lost: ExpertGroupLostError | None = None

    # -- the step -----------------------------------------------------------------------------

    def step(self) -> list[RequestDelta]:
        """One step of the group: this rank's scheduled batch, or an empty one when it has
        nothing (suspended or idle ranks join too); returns this rank's deltas."""
        return self._tick(own_work=True)

    def idle(self) -> bool:
        """Meet the group, bringing no work (an idle, paused or suspended rank); join its step
        with an empty batch when another rank has work. True when it did."""
        self._tick(own_work=False)
        return self.group_tokens > 0

    def _tick(self, *, own_work: bool) -> list[RequestDelta]:
        if self._closed:
            if self.has_unfinished_requests():
                raise ExpertGroupLostError("the expert-parallel group was closed")
            self.group_tokens = 0
            return []
        scheduled = None
        if own_work and not self._suspended and self.has_unfinished_requests():
            scheduled = self.scheduler.schedule()
        tokens = sum(c.num_tokens for c in scheduled.chunks) if scheduled is not None else 0
        self.group_tokens = self._agree(tokens)
        if self._closed:  # another rank closed the group: nobody steps again
            self.group_tokens = 0
            if tokens or self.has_unfinished_requests():
                raise ExpertGroupLostError("another rank closed the expert-parallel group")
            return []
        if tokens:
            with self._collectives():
                return self._run(scheduled)
        if scheduled is not None:
            self._preemptions += len(scheduled.preempted)
        if self.group_tokens:
            self._empty_step()
        return []

    def close(self) -> None:
        """Leave the group: the other ranks learn it at their next step (and stop stepping
        together); a driver calls this when it shuts the engine down."""
        if not self._closed and self._lost is None:
            self._agree(0, closing=True)

    def generate(
        self,
        prompts: Sequence[Sequence[int] | str],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run this rank's ``prompts`` to completion; every rank of the group calls it (with
        its own prompts, possibly none) and it returns once no rank has work left."""
        outputs = super().generate(prompts, sampling_params)
        # Done here; keep joining the group's steps until a step where nobody has work (every
        # rank reaches that same step, so all return together).
        while True:
            self.step()
            if self.group_tokens == 0:
                return outputs

    def _agree(self, tokens: int, *, closing: bool = False) -> int:
        """The group's largest batch (all-reduce MAX), and whether any rank is closing."""
        both = torch.tensor([tokens, int(closing)], dtype=torch.int64, device=self._count_device)
        try:
            dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        except Exception as exc:
            raise self._lose(exc) from exc
        most, closed = both.tolist()
        self._closed = bool(closed)
        return most

    @torch.inference_mode()
    def _empty_step(self) -> None:
        """The collectives of a forward over zero tokens: each MoE layer's dispatch and
        combine, in order (the other layers communicate with no one at TP 1, PP 1)."""
        empty = torch.empty(0, 1, self._hidden, device=self.device, dtype=self.dtype)
        with self._collectives():
            for moe in self._moe_layers:
                moe._routed(empty)
        self.empty_steps += 1

    def _lose(self, exc: BaseException) -> ExpertGroupLostError:
        ranks = dist.get_process_group_ranks(self.group)
        self._lost = ExpertGroupLostError(
            f"a rank of this expert-parallel group (global ranks {ranks}) is gone, and its "
            f"experts with it: {type(exc).__name__}: {exc}"
        )
        return self._lost

    @contextlib.contextmanager
    def _collectives(self) -> Iterator[None]:
        """A failed collective (a rank gone) becomes ``ExpertGroupLostError``."""
        from mcore.inference.replica import ReplicaEngine

        try:
            yield
        except Exception as exc:
            if ReplicaEngine.world_broken(exc):
                raise self._lose(exc) from exc
            raise
