"""The ``hybridep`` flex backend: DeepEP's HybridEP kernels, which dispatch and permute in one go.

``deep_ep.HybridEPBuffer`` (DeepEP's hybrid-ep work, by NVIDIA) takes a dense routing map and
returns the rows already grouped by local expert, with each row's probability and the count per
expert; ``combine_with_unpermute`` undoes both. Calls follow Megatron's ``fused_a2a`` usage:
one buffer per process group shared by all MoE layers, sized at the first dispatch
(``max_num_of_tokens_per_rank``; HybridEP grows it if a later batch is larger), blocking mode
(``non_blocking=False``: the per-expert counts are read on the host), no FP8, no padding.

HybridEP needs at least two ranks in the EP*ETP group, bf16 tokens and fp32 probabilities.
"""

from __future__ import annotations

import inspect
import os
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.distributed as dist

from mcore.moe.dispatcher.flex import (
    FlexBackend,
    backend_error,
    import_optional,
    indices_to_multihot,
)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


class _Dispatch(torch.autograd.Function):
    """HybridEP dispatch with permute; its backward is combine with unpermute (same handle)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        probs: torch.Tensor,
        routing_map: torch.Tensor,
        buffer: Any,
        num_local_experts: int,
        meta: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, row_probs, _, tokens_per_expert, handle = buffer.dispatch_with_permute(
            hidden=x,
            routing_map=routing_map,
            probs=probs,
            scaling_factor=None,
            num_of_experts_per_rank=num_local_experts,
            pad_multiple=None,
            num_permuted_tokens=None,
            non_blocking=False,
        )
        meta["handle"], meta["tokens_per_expert"] = handle, tokens_per_expert
        ctx.buffer, ctx.handle = buffer, handle
        ctx.rows_like = (hidden.shape, hidden.dtype, hidden.device)
        ctx.set_materialize_grads(False)
        return hidden, row_probs.reshape(-1)

    @staticmethod
    def backward(
        ctx: Any, grad_hidden: torch.Tensor | None, grad_row_probs: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        if grad_hidden is None:
            shape, dtype, device = ctx.rows_like
            grad_hidden = torch.zeros(shape, dtype=dtype, device=device)
        probs = None if grad_row_probs is None else grad_row_probs.float().contiguous()
        grad_x, grad_probs = ctx.buffer.combine_with_unpermute(
            hidden=grad_hidden.contiguous(), probs=probs, handle=ctx.handle, pad_multiple=None
        )
        return grad_x, grad_probs, None, None, None, None


class _Combine(torch.autograd.Function):
    """HybridEP combine with unpermute; its backward is dispatch with permute (same handle)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, buffer: Any, handle: Any) -> torch.Tensor:
        combined, _ = buffer.combine_with_unpermute(
            hidden=x.contiguous(), handle=handle, pad_multiple=None
        )
        ctx.buffer, ctx.handle, ctx.rows = buffer, handle, x.shape[0]
        return combined

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_x, _, _, _, _ = ctx.buffer.dispatch_with_permute(
            hidden=grad.contiguous(),
            scaling_factor=None,
            handle=ctx.handle,
            pad_multiple=None,
            num_permuted_tokens=ctx.rows,
        )
        return grad_x[: ctx.rows], None, None


# One HybridEP buffer per process group, shared by every MoE layer (as Megatron's global one).
_BUFFERS: dict[int, tuple[ProcessGroup, Any]] = {}


class HybridEPBackend(FlexBackend):
    """Flex backend on DeepEP's HybridEP kernels (TMA all-to-all with fused permute)."""

    name: ClassVar[str] = "hybridep"

    @classmethod
    def unmet_requirements(cls) -> list[str]:
        """CUDA, and a ``deep_ep`` build that has ``HybridEPBuffer``."""
        problems = []
        if not torch.cuda.is_available():
            problems.append(
                "HybridEP needs CUDA; this process has no GPU; use "
                "moe.token_dispatcher_type = 'alltoall'"
            )
        deep_ep, why = import_optional("deep_ep")
        if deep_ep is None:
            problems.append(
                f"{why}: pip install deep-ep on a machine with NVIDIA GPUs "
                "(DeepEP compiles against its CUDA and NVSHMEM)"
            )
        elif getattr(deep_ep, "HybridEPBuffer", None) is None:
            problems.append(
                "this deep_ep build has no HybridEPBuffer: install DeepEP with HybridEP "
                "(its hybrid-ep branch), or use moe.flex_dispatcher_backend = 'deepep'"
            )
        return problems

    def __init__(
        self,
        group: ProcessGroup | None,
        *,
        hidden_size: int,
        num_experts: int,
        num_local_experts: int,
        max_topk: int | None = None,
        permute_fusion: bool = False,
    ) -> None:
        super().__init__(
            group,
            hidden_size=hidden_size,
            num_experts=num_experts,
            num_local_experts=num_local_experts,
            max_topk=max_topk,
            permute_fusion=permute_fusion,
        )
        if group is None or group.size() < 2:
            size = 0 if group is None else group.size()
            raise backend_error(
                self.name,
                [
                    f"HybridEP needs at least 2 ranks in the expert group, got {size} "
                    "(expert_model_parallel_size * expert_tensor_parallel_size): raise "
                    "expert_model_parallel_size, or use moe.token_dispatcher_type = 'alltoall'"
                ],
            )
        deep_ep, _ = import_optional("deep_ep")
        assert deep_ep is not None, "unmet_requirements() is checked before construction"
        self.deep_ep = deep_ep
        self._handle: Any = None
        self._buffer_of_handle: Any = None

    def dispatch(
        self, hidden: torch.Tensor, topk_indices: torch.Tensor, topk_probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """HybridEP dispatch: rows come back expert-major with their probabilities."""
        if hidden.dtype != torch.bfloat16:
            raise TypeError(
                f"HybridEP moves bf16 tokens only, got {hidden.dtype}: train in bf16 or use "
                "moe.token_dispatcher_type = 'alltoall'"
            )
        buffer = self._buffer(hidden)
        routing_map, probs = indices_to_multihot(topk_indices, topk_probs.float(), self.num_experts)
        assert probs is not None
        meta: dict[str, Any] = {}
        rows, row_probs = _Dispatch.apply(
            hidden.contiguous(),
            probs.contiguous(),
            routing_map.contiguous(),
            buffer,
            self.num_local_experts,
            meta,
        )
        tokens_per_expert = meta["tokens_per_expert"].to("cpu", torch.int64)
        num_rows = int(tokens_per_expert.sum())
        self._handle, self._buffer_of_handle = meta["handle"], buffer
        # Slicing outside the Function keeps autograd's shapes right if HybridEP hands back a
        # larger allocation than the rows it filled.
        return rows[:num_rows], tokens_per_expert, row_probs[:num_rows]

    def combine(self, expert_output: torch.Tensor) -> torch.Tensor:
        """HybridEP combine: unpermute and sum each token's rows back on its rank."""
        if self._handle is None:
            raise RuntimeError("HybridEPBackend.combine was called without a dispatch before it")
        if expert_output.dtype != torch.bfloat16:
            raise TypeError(f"HybridEP combines bf16 rows only, got {expert_output.dtype}")
        out = _Combine.apply(expert_output, self._buffer_of_handle, self._handle)
        self._handle, self._buffer_of_handle = None, None
        return out

    def _buffer(self, hidden: torch.Tensor) -> Any:
        """This group's shared ``HybridEPBuffer``, created (collectively) on first use."""
        assert self.group is not None
        cached = _BUFFERS.get(id(self.group))
        if cached is not None:
            return cached[1]
        # All ranks size the buffer alike: agree on the largest first batch.
        bound = torch.tensor([hidden.shape[0]], device=hidden.device)
        dist.all_reduce(bound, op=dist.ReduceOp.MAX, group=self.group)
        buffer_cls = self.deep_ep.HybridEPBuffer
        kwargs: dict[str, Any] = dict(
            group=self.group,
            hidden_dim=self.hidden_size,
            max_num_of_tokens_per_rank=int(bound.item()),
            num_local_experts=self.num_local_experts,
            use_fp8=False,
        )
        if "num_of_ranks_per_nvlink_domain" in inspect.signature(buffer_cls).parameters:
            kwargs["num_of_ranks_per_nvlink_domain"] = _nvlink_domain(self.group.size())
        buffer = buffer_cls(**kwargs)
        _BUFFERS[id(self.group)] = (self.group, buffer)
        return buffer


def _nvlink_domain(group_size: int) -> int:
    """Ranks of the group that share one NVLink domain (a node, unless MNNVL).

    HybridEP defaults to 8, which fails its divisibility check for a group of 2 or 4 on one
    node; the EP*ETP group is contiguous ranks, so the domain is the ranks per node, capped by
    the group. ``NUM_OF_RANKS_PER_NVLINK_DOMAIN`` (HybridEP's own variable) still wins.
    """
    if "NUM_OF_RANKS_PER_NVLINK_DOMAIN" in os.environ:
        return int(os.environ["NUM_OF_RANKS_PER_NVLINK_DOMAIN"])
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count()))
    domain = min(group_size, max(per_node, 1))
    if group_size % domain:
        raise backend_error(
            HybridEPBackend.name,
            [
                f"the expert group of {group_size} ranks does not split into NVLink domains of "
                f"{domain} ranks: set NUM_OF_RANKS_PER_NVLINK_DOMAIN"
            ],
        )
    return domain
