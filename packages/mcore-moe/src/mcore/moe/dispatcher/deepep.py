"""The ``deepep`` flex backend: DeepEP's fused all-to-all, then a local permute to experts.

DeepEP sends each token once to every rank that holds one of its experts, with its top-k
indices rewritten to that rank's local experts (``-1`` for the others). The backend then
permutes the received tokens expert-major with :func:`mcore.moe.permute.permute`, and on the way
back unpermutes (summing a token's local experts) before DeepEP's combine sums over ranks.

Two DeepEP generations are supported, chosen by what the installed ``deep_ep`` provides:

- ``deep_ep.ElasticBuffer`` (DeepEP 2.x, NCCL-based; works for any group size, one rank too),
  preferred when present;
- ``deep_ep.Buffer`` (DeepEP 1.x normal kernels: ``get_dispatch_layout`` then ``dispatch``;
  group sizes 2, 4, 8, 16, ... only), sized by its dispatch/combine configs' hints.

Both are used synchronously (no ``async_finish``), with one buffer per process group shared by
all MoE layers, as Megatron's ``fused_a2a`` does. Tokens must be bf16, probabilities fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.distributed as dist

from mcore.moe.dispatcher.flex import (
    FlexBackend,
    backend_error,
    import_optional,
    indices_to_multihot,
)
from mcore.moe.permute import permute, unpermute

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def _install_hint(why: str) -> str:
    return (
        f"{why}: pip install deep-ep on a machine with NVIDIA GPUs "
        "(DeepEP compiles against its CUDA and NVSHMEM)"
    )


class _LegacyComm:
    """DeepEP 1.x ``deep_ep.Buffer``: layout, then dispatch; combine by the dispatch handle."""

    def __init__(self, deep_ep: ModuleType, group: ProcessGroup, hidden_bytes: int) -> None:
        size = group.size()
        buffer_cls = deep_ep.Buffer
        configs = (buffer_cls.get_dispatch_config(size), buffer_cls.get_combine_config(size))
        self.num_nvl_bytes = max(c.get_nvl_buffer_size_hint(hidden_bytes, size) for c in configs)
        self.num_rdma_bytes = max(c.get_rdma_buffer_size_hint(hidden_bytes, size) for c in configs)
        self.buffer = buffer_cls(group, self.num_nvl_bytes, self.num_rdma_bytes)

    def dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int], Any]:
        per_rank, per_rdma_rank, per_expert, in_rank, _ = self.buffer.get_dispatch_layout(
            topk_idx, num_experts
        )
        recv_x, recv_idx, recv_weights, counts, handle, _ = self.buffer.dispatch(
            x,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
        )
        return recv_x, recv_idx, recv_weights, list(counts), handle

    def dispatch_cached(self, x: torch.Tensor, handle: Any) -> torch.Tensor:
        recv_x, _, _, _, _, _ = self.buffer.dispatch(x, handle=handle)
        return recv_x

    def combine(
        self, x: torch.Tensor, handle: Any, topk_weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        combined, combined_weights, _ = self.buffer.combine(x, handle, topk_weights=topk_weights)
        return combined, combined_weights


class _ElasticComm:
    """DeepEP 2.x ``deep_ep.ElasticBuffer``: dispatch computes its own layout."""

    def __init__(
        self,
        deep_ep: ModuleType,
        group: ProcessGroup,
        *,
        max_tokens_per_rank: int,
        hidden_size: int,
        max_topk: int | None,
    ) -> None:
        self.max_tokens_per_rank = max_tokens_per_rank
        # num_topk = 0 sizes the buffer by the group size alone: larger, but safe when the
        # number of routes per token is not known in advance.
        self.buffer = deep_ep.ElasticBuffer(
            group,
            num_max_tokens_per_rank=max_tokens_per_rank,
            hidden=hidden_size,
            num_topk=max_topk or 0,
        )

    def dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int], Any]:
        recv_x, recv_idx, recv_weights, handle, _ = self.buffer.dispatch(
            x,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            num_experts=num_experts,
            num_max_tokens_per_rank=self.max_tokens_per_rank,
        )
        return recv_x, recv_idx, recv_weights, list(handle.num_recv_tokens_per_expert_list), handle

    def dispatch_cached(self, x: torch.Tensor, handle: Any) -> torch.Tensor:
        # ElasticBuffer picks its SM count before it reads num_experts from the handle, so
        # both are passed (the handle's own values, which it checks against).
        recv_x, _, _, _, _ = self.buffer.dispatch(
            x, handle=handle, num_experts=handle.num_experts, num_sms=handle.num_sms
        )
        return recv_x

    def combine(
        self, x: torch.Tensor, handle: Any, topk_weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        combined, combined_weights, _ = self.buffer.combine(x, handle, topk_weights=topk_weights)
        return combined, combined_weights


@dataclass
class _DispatchMeta:
    """What one dispatch leaves for its combine, filled in by :class:`_Dispatch`."""

    handle: Any = None
    counts: list[int] = field(default_factory=list)


class _Dispatch(torch.autograd.Function):
    """DeepEP dispatch; its backward is DeepEP combine with the same handle."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        comm: _LegacyComm | _ElasticComm,
        num_experts: int,
        meta: _DispatchMeta,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        recv_x, recv_idx, recv_weights, counts, handle = comm.dispatch(
            x, topk_idx, topk_weights, num_experts
        )
        meta.handle, meta.counts = handle, counts
        ctx.comm, ctx.handle = comm, handle
        ctx.recv_like = (recv_x.shape, recv_x.dtype, recv_x.device)
        ctx.mark_non_differentiable(recv_idx)
        ctx.set_materialize_grads(False)
        return recv_x, recv_idx, recv_weights

    @staticmethod
    def backward(
        ctx: Any,
        grad_recv_x: torch.Tensor | None,
        _grad_recv_idx: torch.Tensor | None,
        grad_recv_weights: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        if grad_recv_x is None:
            shape, dtype, device = ctx.recv_like
            grad_recv_x = torch.zeros(shape, dtype=dtype, device=device)
        weights = None if grad_recv_weights is None else grad_recv_weights.float().contiguous()
        grad_x, grad_weights = ctx.comm.combine(
            grad_recv_x.contiguous(), ctx.handle, topk_weights=weights
        )
        return grad_x, None, grad_weights, None, None, None


class _Combine(torch.autograd.Function):
    """DeepEP combine; its backward is a DeepEP dispatch that reuses the handle."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, comm: _LegacyComm | _ElasticComm, handle: Any
    ) -> torch.Tensor:
        combined, _ = comm.combine(x.contiguous(), handle)
        ctx.comm, ctx.handle, ctx.rows = comm, handle, x.shape[0]
        return combined

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_x = ctx.comm.dispatch_cached(grad.contiguous(), ctx.handle)
        return grad_x[: ctx.rows], None, None


# One DeepEP buffer per process group, shared by every MoE layer: the buffers are large and
# hold no per-layer state (the handles do).
_COMMS: dict[int, tuple[ProcessGroup, _LegacyComm | _ElasticComm]] = {}


class DeepEPBackend(FlexBackend):
    """Flex backend on DeepEP's high-throughput kernels (NVLink within a node, RDMA across)."""

    name: ClassVar[str] = "deepep"

    @classmethod
    def unmet_requirements(cls) -> list[str]:
        """CUDA, and a ``deep_ep`` build with ``ElasticBuffer`` or ``Buffer``."""
        problems = []
        if not torch.cuda.is_available():
            problems.append(
                "DeepEP needs CUDA; this process has no GPU; use "
                "moe.token_dispatcher_type = 'alltoall'"
            )
        deep_ep, why = import_optional("deep_ep")
        if deep_ep is None:
            problems.append(_install_hint(str(why)))
        elif _buffer_kind(deep_ep) is None:
            problems.append(
                _install_hint("this deep_ep build provides neither ElasticBuffer nor Buffer")
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
        if group is None:
            raise backend_error(self.name, ["it needs an NCCL process group, got none"])
        deep_ep, _ = import_optional("deep_ep")
        assert deep_ep is not None, "unmet_requirements() is checked before construction"
        self.deep_ep = deep_ep
        self.kind = _buffer_kind(deep_ep)
        if self.kind == "legacy":
            _check_legacy_group_size(deep_ep, group.size())
        self._handle: Any = None
        self._comm_of_handle: _LegacyComm | _ElasticComm | None = None
        self._sorted_indices: torch.Tensor | None = None
        self._num_received = 0

    def dispatch(
        self, hidden: torch.Tensor, topk_indices: torch.Tensor, topk_probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DeepEP dispatch, then permute the received tokens expert-major."""
        _check_dtype(hidden)
        comm = self._comm(hidden)
        idx_dtype = getattr(self.deep_ep, "topk_idx_t", torch.int64)
        meta = _DispatchMeta()
        recv_x, recv_idx, recv_weights = _Dispatch.apply(
            hidden.contiguous(),
            topk_indices.to(idx_dtype).contiguous(),
            topk_probs.float().contiguous(),
            comm,
            self.num_experts,
            meta,
        )
        # Received indices are local to this rank's experts (-1 for another rank's).
        routing_map, local_probs = indices_to_multihot(
            recv_idx, recv_weights, self.num_local_experts
        )
        num_rows = sum(meta.counts)
        tokens, row_probs, sorted_indices = permute(
            recv_x,
            routing_map,
            local_probs,
            num_out_tokens=num_rows,
            fused=self.permute_fusion,
        )
        self._handle, self._comm_of_handle = meta.handle, comm
        self._sorted_indices = sorted_indices
        self._num_received = recv_x.shape[0]
        tokens_per_expert = torch.tensor(meta.counts, dtype=torch.int64)
        assert row_probs is not None  # dispatched with their probabilities
        return tokens, tokens_per_expert, row_probs

    def combine(self, expert_output: torch.Tensor) -> torch.Tensor:
        """Unpermute to one row per received token, then DeepEP combine to the senders."""
        comm, handle, sorted_indices = self._comm_of_handle, self._handle, self._sorted_indices
        if comm is None or sorted_indices is None:
            raise RuntimeError("DeepEPBackend.combine was called without a dispatch before it")
        _check_dtype(expert_output)
        received = unpermute(
            expert_output, sorted_indices, self._num_received, fused=self.permute_fusion
        )
        out = _Combine.apply(received, comm, handle)
        self._handle, self._comm_of_handle, self._sorted_indices = None, None, None
        return out

    def _comm(self, hidden: torch.Tensor) -> _LegacyComm | _ElasticComm:
        """This group's shared buffer, created (collectively) on first use."""
        assert self.group is not None
        cached = _COMMS.get(id(self.group))
        comm = cached[1] if cached is not None else None
        if self.kind == "legacy":
            # Megatron's sizing: bytes per token row, at least 2 per element.
            hidden_bytes = self.hidden_size * 2
            if comm is None or not isinstance(comm, _LegacyComm):
                comm = _LegacyComm(self.deep_ep, self.group, hidden_bytes)
                _COMMS[id(self.group)] = (self.group, comm)
            return comm
        num_tokens = hidden.shape[0]
        if comm is None:
            # Every rank must give ElasticBuffer the same bound; agree on the largest batch.
            bound = torch.tensor([num_tokens], device=hidden.device)
            dist.all_reduce(bound, op=dist.ReduceOp.MAX, group=self.group)
            comm = _ElasticComm(
                self.deep_ep,
                self.group,
                max_tokens_per_rank=int(bound.item()),
                hidden_size=self.hidden_size,
                max_topk=self.max_topk,
            )
            _COMMS[id(self.group)] = (self.group, comm)
        assert isinstance(comm, _ElasticComm)
        if num_tokens > comm.max_tokens_per_rank:
            raise RuntimeError(
                f"{num_tokens} tokens on this rank exceed the {comm.max_tokens_per_rank} the "
                "DeepEP buffer was sized for at the first MoE layer's dispatch; keep the "
                "micro-batch shape fixed during a run"
            )
        return comm


def _buffer_kind(deep_ep: ModuleType) -> str | None:
    """``"elastic"`` (DeepEP 2.x, preferred), ``"legacy"`` (1.x ``Buffer``) or ``None``."""
    if getattr(deep_ep, "ElasticBuffer", None) is not None:
        return "elastic"
    if getattr(deep_ep, "Buffer", None) is not None:
        return "legacy"
    return None


def _check_legacy_group_size(deep_ep: ModuleType, size: int) -> None:
    """DeepEP 1.x has kernel configs for a fixed set of group sizes; refuse others up front."""
    try:
        deep_ep.Buffer.get_dispatch_config(size)
    except AssertionError:
        raise backend_error(
            DeepEPBackend.name,
            [
                f"deep_ep.Buffer (DeepEP 1.x) has no kernels for an expert group of {size} "
                "rank(s) (expert_model_parallel_size * expert_tensor_parallel_size; it "
                "supports 2, 4, 8, 16, ...): change the layout, install DeepEP 2.x "
                "(ElasticBuffer, any size), or use moe.token_dispatcher_type = 'alltoall'"
            ],
        ) from None


def _check_dtype(t: torch.Tensor) -> None:
    if t.dtype != torch.bfloat16:
        raise TypeError(
            f"DeepEP moves bf16 tokens only, got {t.dtype}: train in bf16 or use "
            "moe.token_dispatcher_type = 'alltoall'"
        )
