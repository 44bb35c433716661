"""The ``flex`` token dispatcher: one fused all-to-all over the EP*ETP ranks, done by a backend.

:class:`FlexDispatcher` turns the dense routing it is given into DeepEP's top-k form (expert
indices per token, ``-1`` where a row has fewer), hands it to a :class:`FlexBackend` picked by
``moe.flex_dispatcher_backend`` from the ``flex_backend`` registry (``deepep``, ``hybridep``),
and weights the experts' output rows by their probabilities on the way back.

Like Megatron's flex dispatcher, the communication group spans the expert-parallel *and*
expert-tensor-parallel ranks: with ``expert_tensor_parallel_size > 1`` every token is sent to
all ETP ranks of its expert (as if each ETP rank held its own copy of the expert), and the
combine's sum adds up the ETP ranks' partial outputs. The experts must therefore leave their
row-parallel output unreduced, as they do under Megatron's alltoall dispatcher.

The backends need NVIDIA GPUs, NCCL and a DeepEP build; the dispatcher checks all three when it
is built and raises :class:`FlexBackendUnavailable` naming what is missing. It never falls back
to another dispatcher.
"""

from __future__ import annotations

import importlib
import importlib.util
import weakref
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
import torch.distributed as dist

from mcore.core.errors import McoreError
from mcore.moe.dispatcher.base import DispatchOutput, TokenDispatcher
from mcore.moe.protocols import FlexBackend as FlexBackendProtocol
from mcore.moe.protocols import flex_backend_class

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from mcore.models import ModelContext
    from mcore.moe.config import MoEConfig
    from mcore.parallel import ParallelState

FIELD = "moe.flex_dispatcher_backend"
"""The config field that picks a backend; every message about backends names it."""


class FlexBackendUnavailable(McoreError, RuntimeError):
    """The chosen flex backend cannot run in this process (no GPU, no library, no NCCL)."""


def backend_error(name: str | None, problems: list[str]) -> FlexBackendUnavailable:
    """One error listing every reason backend ``name`` cannot run, each with its fix."""
    lines = "\n".join(f"  - {p}" for p in problems)
    return FlexBackendUnavailable(f"{FIELD} = {name!r} cannot run in this process:\n{lines}")


def import_optional(module: str) -> tuple[ModuleType | None, str | None]:
    """Import ``module`` if it is installed: ``(module, None)``, else ``(None, why)``.

    Tells "not installed" apart from "installed but broken" (a DeepEP build against another
    CUDA or NCCL fails at import), since the fixes differ.
    """
    if importlib.util.find_spec(module) is None:
        return None, f"{module} is not installed"
    try:
        return importlib.import_module(module), None
    except Exception as exc:  # any import-time failure of a native extension lands here
        return None, f"{module} is installed but failed to import ({type(exc).__name__}: {exc})"


class FlexBackend:
    """A base for flex backends: keeps the constructor's arguments and reports no unmet
    requirements. The contract (construction, :meth:`dispatch`, :meth:`combine`) is
    :class:`mcore.moe.protocols.FlexBackend`; one instance serves one MoE layer."""

    name: ClassVar[str] = ""
    """The registry name, for messages."""
    needs_nccl: ClassVar[bool] = True
    """Whether the backend needs a CUDA process group (NCCL); the dispatcher checks it."""

    @classmethod
    def unmet_requirements(cls) -> list[str]:
        return []

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
        self.group = group
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.num_local_experts = num_local_experts
        self.max_topk = max_topk
        self.permute_fusion = permute_fusion

    def dispatch(
        self, hidden: torch.Tensor, topk_indices: torch.Tensor, topk_probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def combine(self, expert_output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def indices_to_multihot(
    indices: torch.Tensor, values: torch.Tensor | None, num_columns: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(map [R, C] bool, dense [R, C])`` from ``indices`` ``[R, k]`` (``-1``: none) and their
    ``values``; differentiable in ``values``."""
    rows = indices.shape[0]
    # Entries of -1 go to a spare last column that is cut off, so no valid entry is overwritten.
    target = torch.where(indices >= 0, indices, num_columns).long()
    routing_map = torch.zeros(rows, num_columns + 1, dtype=torch.bool, device=indices.device)
    routing_map.scatter_(1, target, True)
    if values is None:
        return routing_map[:, :num_columns], None
    dense = torch.zeros(rows, num_columns + 1, dtype=values.dtype, device=values.device)
    dense = dense.scatter(1, target, values)
    return routing_map[:, :num_columns], dense[:, :num_columns]


def topk_from_dense(
    probs: torch.Tensor, routing_map: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepEP's top-k form of a dense routing: the ``k`` routed experts of each token (int64,
    ``-1`` where a row routes fewer) and their probabilities (fp32, zero there).

    Routed experts are found from ``routing_map``, not from ``probs``: a token routed with
    probability zero (padding for quantised GEMMs) must still travel.
    """
    k = min(k, routing_map.shape[1])
    present, indices = routing_map.to(torch.uint8).topk(k, dim=1)
    valid = present.bool()
    topk_probs = torch.where(valid, probs.gather(1, indices).float(), 0.0)
    return torch.where(valid, indices, -1), topk_probs


def expand_for_etp(
    indices: torch.Tensor, probs: torch.Tensor, etp: int, num_local_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Send each token to every ETP rank of its expert: expert ``e`` (EP rank ``e // L``, local
    ``e % L``) becomes ``(ep_rank * etp + t) * L + e % L`` for each ETP rank ``t``, the expert
    numbering over the EP*ETP group (ETP varies fastest in the expert mesh)."""
    ep_rank = indices.div(num_local_experts, rounding_mode="floor").unsqueeze(-1)
    local = indices.remainder(num_local_experts).unsqueeze(-1)
    etp_rank = torch.arange(etp, device=indices.device)
    expanded = ((ep_rank * etp + etp_rank) * num_local_experts + local).flatten(1)
    valid = (indices >= 0).unsqueeze(-1).expand(-1, -1, etp).flatten(1)
    expanded_probs = probs.unsqueeze(-1).expand(-1, -1, etp).flatten(1)
    return torch.where(valid, expanded, -1), expanded_probs


_EP_ETP_GROUPS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def expert_comm_group(state: ParallelState) -> ProcessGroup | None:
    """The group of this rank's EP*ETP ranks, where one layer's experts live (``None`` in a
    single-process state). Built once per state: creating it is a collective over the world."""
    if state.expert_mesh is None:
        return None
    if state.etp_size == 1:
        return state.ep_group
    if state.ep_size == 1:
        return state.etp_group
    group = _EP_ETP_GROUPS.get(state)
    if group is None:
        # ep and etp are the mesh's innermost dims, so each (pp, edp) row of ep*etp ranks is
        # one group, in rank order ep-major: group rank ep_rank * etp + etp_rank.
        span = state.ep_size * state.etp_size
        members = state.expert_mesh.mesh.reshape(-1, span).tolist()
        created, _ = dist.new_subgroups_by_enumeration(members, group_desc="ep_etp")
        group = _EP_ETP_GROUPS[state] = cast("ProcessGroup", created)  # every rank is in one
    return group


def nccl_problems(group: ProcessGroup | None) -> list[str]:
    """Why ``group`` cannot carry a flex backend's traffic (empty when it can)."""
    if group is None:
        return [
            "it needs torch.distributed with NCCL, which is not initialized: launch with "
            "torchrun and parallel.distributed_backend = 'nccl' (tests: "
            "mcore.core.testing.run_ranks(..., backend='nccl'))"
        ]
    backend = str(dist.get_backend(group))
    if "nccl" not in backend:
        return [
            f"the expert-parallel group uses {backend!r}, not NCCL: set "
            "parallel.distributed_backend = 'nccl'"
        ]
    return []


class FlexDispatcher(TokenDispatcher):
    """Token dispatcher whose all-to-all is a fused backend (DeepEP, HybridEP) over EP*ETP."""

    def __init__(
        self,
        ctx: ModelContext,
        moe: MoEConfig,
        *,
        num_local_experts: int,
        local_expert_indices: list[int],
    ) -> None:
        super().__init__(
            ctx, moe, num_local_experts=num_local_experts, local_expert_indices=local_expert_indices
        )
        name = moe.flex_dispatcher_backend
        if name is None:
            raise FlexBackendUnavailable(
                f"{FIELD} is unset; token_dispatcher_type = 'flex' needs a backend: "
                "deepep or hybridep"
            )
        if moe.pad_expert_input_to_capacity:
            # Padding at the source would ship every padded row across the network; Megatron's
            # flex dispatcher refuses it too.
            raise FlexBackendUnavailable(
                "moe.pad_expert_input_to_capacity is not supported by the flex dispatcher; "
                "unset it or use moe.token_dispatcher_type = 'alltoall'"
            )
        backend_cls = flex_backend_class(ctx.registries, name)
        state = self.parallel_state
        problems = list(backend_cls.unmet_requirements())
        group = None
        if backend_cls.needs_nccl:
            # Library and GPU first: without them the group check would only add noise.
            if not problems:
                group = expert_comm_group(state)
                problems += nccl_problems(group)
        else:
            group = expert_comm_group(state)
        if problems:
            raise backend_error(name, problems)

        self.etp = state.etp_size
        group_experts = self.num_experts * self.etp
        if group is not None and group.size() * num_local_experts != group_experts:
            raise ValueError(
                f"{num_local_experts} local experts on each of {group.size()} EP*ETP ranks do "
                f"not make moe.num_experts ({self.num_experts}) * expert_tensor_parallel_size "
                f"({self.etp})"
            )
        # Rows carry more than router_topk experts only when padding adds zero-probability
        # routes; then the width is measured per batch (one host sync).
        self.topk: int | None = None if moe.router_padding_for_quantization else moe.router_topk
        self.backend: FlexBackendProtocol = backend_cls(
            group,
            hidden_size=ctx.config.hidden_size,
            num_experts=group_experts,
            num_local_experts=num_local_experts,
            max_topk=None if self.topk is None else self.topk * self.etp,
            permute_fusion=moe.permute_fusion,
        )
        self._row_probs: torch.Tensor | None = None

    def dispatch(
        self, hidden: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor
    ) -> DispatchOutput:
        """Send tokens through the backend; rows come back expert-major with their probs."""
        k = self.topk
        if k is None:
            k = max(1, int(routing_map.sum(dim=1).max()))
        indices, topk_probs = topk_from_dense(probs, routing_map, k)
        if self.etp > 1:
            indices, topk_probs = expand_for_etp(
                indices, topk_probs, self.etp, self.num_local_experts
            )
        tokens, tokens_per_expert, row_probs = self.backend.dispatch(hidden, indices, topk_probs)
        self._row_probs = row_probs
        return DispatchOutput(tokens=tokens, tokens_per_expert=tokens_per_expert, probs=row_probs)

    def combine(self, expert_output: torch.Tensor, *, probs_applied: bool = False) -> torch.Tensor:
        """Weight rows by their probabilities (unless the experts did) and sum them home."""
        if self._row_probs is None:
            raise RuntimeError("FlexDispatcher.combine was called without a dispatch before it")
        if not probs_applied:
            # Weight in fp32 and return to the experts' dtype: the backends move bf16 only.
            weighted = expert_output.float() * self._row_probs.unsqueeze(-1)
            expert_output = weighted.to(expert_output.dtype)
        self._row_probs = None
        return self.backend.combine(expert_output)
