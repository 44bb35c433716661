"""mcore-moe's extension points are typed protocols: every registered router, token dispatcher
and flex backend satisfies its protocol, and the registries refuse an entry that does not,
naming the kind, the entry and the members it lacks."""

from __future__ import annotations

import pytest
import torch

from mcore.core import KINDS, Lazy, McoreError, PluginManager, hookimpl
from mcore.models import ModelContext, TransformerConfig
from mcore.moe.config import MoEConfig
from mcore.moe.protocols import (
    FlexBackend,
    Router,
    TokenDispatcher,
    flex_backend_class,
    router_builder,
    token_dispatcher_builder,
)
from mcore.moe.router import RouterOutput
from mcore.parallel import ParallelState

MOE = MoEConfig(num_experts=4, router_topk=2)


@pytest.fixture(scope="module")
def manager() -> PluginManager:
    return PluginManager().load_entry_points(only=["mcore-parallel", "mcore-models", "mcore-moe"])


def _context(registries) -> ModelContext:
    return ModelContext(TransformerConfig(hidden_size=16), ParallelState(), registries=registries)


def test_every_registered_router_builds_a_router(manager) -> None:
    ctx = _context(manager.registries)
    for name in manager.registries.names("router"):
        router = router_builder(manager.registries, name)(ctx, MOE, layer_number=0)
        assert isinstance(router, Router), name
        out = router(torch.randn(3, 16))
        assert isinstance(out, RouterOutput) and out.indices.shape == (3, 2), name


def test_every_registered_dispatcher_satisfies_its_protocol(manager) -> None:
    ctx = _context(manager.registries)
    dispatchers = manager.registries["token_dispatcher"]
    for name in dispatchers.names():
        assert KINDS["token_dispatcher"].missing_members(dispatchers.get(name)) == [], name
    for name in ("allgather", "alltoall"):  # flex needs GPUs and DeepEP to build
        built = token_dispatcher_builder(manager.registries, name)(
            ctx, MOE, num_local_experts=4, local_expert_indices=[0, 1, 2, 3]
        )
        assert isinstance(built, TokenDispatcher), name


def test_every_registered_flex_backend_satisfies_its_protocol(manager) -> None:
    # The backends need NCCL and DeepEP to build; their classes carry every member.
    for name in manager.registries.names("flex_backend"):
        backend = flex_backend_class(manager.registries, name)
        assert KINDS["flex_backend"].missing_members(backend) == [], name
        assert isinstance(backend.needs_nccl, bool) and callable(backend.unmet_requirements)
        assert isinstance(object.__new__(backend), FlexBackend), name


class NoForward:
    """A router that is no ``torch.nn.Module`` and has no ``forward``. (A module subclass
    always has one, torch's placeholder that raises; the type checker catches that case.)"""

    def __init__(self, ctx, moe, *, layer_number) -> None: ...

    def route(self, hidden):
        return hidden


class OnlyDispatch:
    def __init__(self, ctx, moe, *, num_local_experts, local_expert_indices) -> None: ...

    def dispatch(self, hidden, probs, routing_map): ...


class HalfBackend:
    needs_nccl = False

    def dispatch(self, hidden, topk_indices, topk_probs): ...


def _register(kind: str, name: str, entry: object) -> PluginManager:
    class Plugin:
        @hookimpl
        def mcore_register(self, registry) -> None:
            registry.add(kind, name, entry)

    manager = PluginManager()
    manager.register(Plugin(), name="incomplete")
    return manager


@pytest.mark.parametrize(
    ("kind", "entry", "missing"),
    [
        ("router", NoForward, "`forward`, `__call__`"),
        ("token_dispatcher", OnlyDispatch, "`combine`"),
        ("flex_backend", HalfBackend, "`unmet_requirements`, `combine`"),
    ],
)
def test_a_class_lacking_protocol_members_is_refused(kind, entry, missing) -> None:
    with pytest.raises(McoreError) as info:
        _register(kind, "incomplete", entry)
    message = str(info.value)
    assert f"registered {kind} 'incomplete'" in message
    assert f"lacks {missing} of the" in message
    assert KINDS[kind].protocol in message


def test_a_lazy_entry_is_checked_when_first_resolved() -> None:
    manager = _register("router", "later", Lazy(f"{__name__}:NoForward"))
    with pytest.raises(McoreError, match=r"router 'later' .* lacks `forward`"):
        manager.registries.get("router", "later")


def test_what_a_factory_builds_is_checked_when_built() -> None:
    def build_no_router(ctx, moe, *, layer_number):
        return NoForward(ctx, moe, layer_number=layer_number)

    manager = _register("router", "factory", build_no_router)
    ctx = _context(manager.registries)
    with pytest.raises(McoreError, match=r"router 'factory' .* built a NoForward, which lacks"):
        ctx.build("router", "factory", ctx, MOE, layer_number=0)
