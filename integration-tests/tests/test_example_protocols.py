"""The example plugins implement the extension points' protocols: examples/custom-router-plugin's
``example_random`` is a :class:`mcore.moe.protocols.Router` (its registry entry is checked
when first resolved), and examples/lora-plugin's hooks validate against the hook specs."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from mcore.core import KINDS, PluginManager
from mcore.models import ModelContext, TransformerConfig
from mcore.moe.config import MoEConfig
from mcore.moe.protocols import Router, router_builder
from mcore.parallel import ParallelState

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_the_example_router_is_a_router(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES / "custom-router-plugin" / "src"))
    manager = PluginManager()
    manager.register(importlib.import_module("mcore_example_router.plugin"), "example-router")
    build = router_builder(manager.registries, "example_random")  # resolved and checked
    assert KINDS["router"].missing_members(build) == []
    ctx = ModelContext(
        TransformerConfig(hidden_size=8), ParallelState(), registries=manager.registries
    )
    router = build(ctx, MoEConfig(num_experts=4, router_topk=2), layer_number=0)
    assert isinstance(router, Router)
    assert router(torch.randn(5, 8)).indices.shape == (5, 2)


def test_the_example_lora_plugin_implements_only_known_hooks(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES / "lora-plugin" / "src"))
    manager = PluginManager()
    info = manager.register(importlib.import_module("mcore_example_lora.plugin"), "example-lora")
    assert info.ok
    assert manager.hooks_of("example-lora") == [
        "mcore_on_model_built",
        "mcore_step_metrics",
        "mcore_validate_config",
    ]
