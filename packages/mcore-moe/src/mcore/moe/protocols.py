"""The extension points of mcore-moe: routers, token dispatchers and flex backends.

Each is a registry kind (``router``, ``token_dispatcher``, ``flex_backend``) whose entries the
registry checks against the protocol here when they are added (or, registered by import path,
first used): an entry missing a member is refused with the members it lacks. The base classes
:class:`mcore.moe.router.Router`, :class:`mcore.moe.dispatcher.base.TokenDispatcher` and
:class:`mcore.moe.dispatcher.flex.FlexBackend` implement them; subclassing one is the short way
to write a component, but any class with these members will do.

The ``*Builder`` protocols type the registry entries themselves: what
:func:`router_builder` and friends return, and what :class:`~mcore.moe.layer.MoELayer` calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Protocol, cast, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch.distributed import ProcessGroup

    from mcore.core.registry import Registries
    from mcore.models import ModelContext
    from mcore.moe.config import MoEConfig
    from mcore.moe.dispatcher.base import DispatchOutput
    from mcore.moe.router import RouterOutput

__all__ = [
    "FlexBackend",
    "Router",
    "RouterBuilder",
    "TokenDispatcher",
    "TokenDispatcherBuilder",
    "flex_backend_class",
    "router_builder",
    "token_dispatcher_builder",
]


@runtime_checkable
class Router(Protocol):
    """Scores this rank's tokens and picks their experts; built once per MoE layer.

    A ``torch.nn.Module`` in practice: its parameters then belong to the model (trained,
    reduced, checkpointed), and calling it runs :meth:`forward`. What follows routing (router
    replay, capacity and token dropping, padding, the balancing losses) is the MoE layer's. A
    router with an ``expert_bias`` buffer ``[num_experts]`` (fp32) that only shifts which
    experts are chosen gets DeepSeek-V3's aux-loss-free bias update after every step.
    """

    def forward(
        self, hidden: torch.Tensor, replay_indices: torch.Tensor | None = None
    ) -> RouterOutput:
        """Route ``hidden`` ``[tokens, hidden]``. With ``replay_indices`` (``[tokens, topk]``,
        recorded earlier) choose exactly those experts and only recompute their
        probabilities. ``scores`` and ``logits`` of the output may be ``None`` when the
        router has none (the balancing losses then cannot be asked for)."""
        ...

    def __call__(
        self, hidden: torch.Tensor, replay_indices: torch.Tensor | None = None
    ) -> RouterOutput:
        """What the MoE layer calls: ``forward`` (``torch.nn.Module.__call__``)."""
        ...


class RouterBuilder(Protocol):
    """A ``router`` registry entry: a :class:`Router` class, or a factory of the same
    signature (``layer_number`` is the MoE layer's index in the model)."""

    def __call__(self, ctx: ModelContext, moe: MoEConfig, *, layer_number: int) -> Router: ...


@runtime_checkable
class TokenDispatcher(Protocol):
    """Sends this rank's routed tokens to the ranks of their experts and brings the experts'
    output back; built once per MoE layer. Both directions are differentiable (tokens and
    probabilities) and :meth:`combine` undoes the latest :meth:`dispatch`."""

    def dispatch(
        self, hidden: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor
    ) -> DispatchOutput:
        """Send ``hidden`` ``[tokens, hidden]`` to the experts ``routing_map`` (bool
        ``[tokens, num_experts]``) picks, with ``probs`` (``[tokens, num_experts]``, zero
        where not routed); returns the rows of this rank's experts, expert by expert."""
        ...

    def combine(self, expert_output: torch.Tensor, *, probs_applied: bool = False) -> torch.Tensor:
        """``expert_output`` (rows as :meth:`dispatch` returned them) summed back into the
        tokens they came from, ``[tokens, hidden]``, weighted by the routing probabilities
        unless ``probs_applied`` says the experts already did."""
        ...


class TokenDispatcherBuilder(Protocol):
    """A ``token_dispatcher`` registry entry: a :class:`TokenDispatcher` class, or a factory
    of the same signature (this rank's experts are ``local_expert_indices``)."""

    def __call__(
        self,
        ctx: ModelContext,
        moe: MoEConfig,
        *,
        num_local_experts: int,
        local_expert_indices: list[int],
    ) -> TokenDispatcher: ...


@runtime_checkable
class FlexBackend(Protocol):
    """A fused all-to-all of the ``flex`` token dispatcher over the EP*ETP ranks; the
    ``flex_backend`` registry holds the class itself.

    The dispatcher asks the class what this process lacks, then builds one instance per MoE
    layer, which keeps what :meth:`combine` needs from the latest :meth:`dispatch`. Classes
    override the class variables with ``ClassVar`` annotations of their own.
    """

    needs_nccl: ClassVar[bool]
    """Whether the backend needs a CUDA process group (NCCL); the dispatcher checks it."""

    @classmethod
    def unmet_requirements(cls) -> list[str]:
        """What this process lacks to run the backend, each entry saying the fix (empty:
        ready)."""
        ...

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
        """``group`` spans the EP*ETP ranks (``None`` only without ``needs_nccl`` in a single
        process); ``num_experts`` counts the experts over that group
        (``group.size() * num_local_experts``) and ``max_topk`` bounds the columns of
        ``topk_indices`` (``None``: unknown)."""
        ...

    def dispatch(
        self, hidden: torch.Tensor, topk_indices: torch.Tensor, topk_probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Send ``hidden`` ``[T, H]`` to the experts ``topk_indices`` (``[T, k]`` int64, ``-1``
        for none) picks, with ``topk_probs`` (``[T, k]`` fp32): this rank's expert rows
        (expert-major), ``tokens_per_expert`` (CPU int64 ``[num_local_experts]``) and each
        row's probability ``[rows]``. Differentiable in ``hidden`` and ``topk_probs``."""
        ...

    def combine(self, expert_output: torch.Tensor) -> torch.Tensor:
        """Sum the rows of ``expert_output`` (as :meth:`dispatch` returned them) back into
        their tokens: ``[T, H]``. Differentiable."""
        ...


def router_builder(registries: Registries, name: str) -> RouterBuilder:
    """The ``router`` registry's entry ``name`` (checked against :class:`Router`)."""
    return cast("RouterBuilder", registries.get("router", name))


def token_dispatcher_builder(registries: Registries, name: str) -> TokenDispatcherBuilder:
    """The ``token_dispatcher`` registry's entry ``name`` (checked against
    :class:`TokenDispatcher`)."""
    return cast("TokenDispatcherBuilder", registries.get("token_dispatcher", name))


def flex_backend_class(registries: Registries, name: str) -> type[FlexBackend]:
    """The ``flex_backend`` registry's class ``name`` (checked against :class:`FlexBackend`)."""
    return cast("type[FlexBackend]", registries.get("flex_backend", name))


if TYPE_CHECKING:
    # The built-in entries conform: the type checker verifies these assignments.
    from mcore.moe.dispatcher.allgather import AllGatherDispatcher
    from mcore.moe.dispatcher.alltoall import AllToAllDispatcher
    from mcore.moe.dispatcher.deepep import DeepEPBackend
    from mcore.moe.dispatcher.flex import FlexDispatcher
    from mcore.moe.dispatcher.hybridep import HybridEPBackend
    from mcore.moe.router import TopKRouter, build_topk_router

    _ROUTERS: list[RouterBuilder] = [build_topk_router, TopKRouter]
    _DISPATCHERS: list[TokenDispatcherBuilder] = [
        AllGatherDispatcher,
        AllToAllDispatcher,
        FlexDispatcher,
    ]
    _FLEX_BACKENDS: list[type[FlexBackend]] = [DeepEPBackend, HybridEPBackend]
