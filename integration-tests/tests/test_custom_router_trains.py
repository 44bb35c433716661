"""The example router plugin (examples/custom-router-plugin) routes a real MoE model that trains.

The plugin module is registered at run time with the process-wide plugin manager, under the name
its entry point gives it once installed (test_custom_plugin.py covers the installed wheel); a
config then selects it by name, ``moe.router_type = "example_random"``, and ``mcore train``'s loop
runs on the CPU.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mcore.core import (
    PluginManager,
    get_plugin_manager,
    load_config,
    register_plugin,
    unregister_plugin,
)
from mcore.core.training.loop import train

EXAMPLE_SRC = Path(__file__).resolve().parents[2] / "examples" / "custom-router-plugin" / "src"
STEPS, MICRO_BATCHES, MOE_LAYERS = 10, 2, 2


@pytest.fixture
def manager(monkeypatch: pytest.MonkeyPatch) -> Iterator[PluginManager]:
    """The workspace's plugins plus the example, registered under its entry-point name."""
    monkeypatch.syspath_prepend(str(EXAMPLE_SRC))
    register_plugin(importlib.import_module("mcore_example_router.plugin"), name="example-router")
    yield get_plugin_manager()
    unregister_plugin("example-router")


def _config(manager: PluginManager, cache_dir: Path):
    return load_config(
        overrides={
            "train.train-iters": str(STEPS),
            "train.micro-batch-size": "2",
            "train.global-batch-size": str(2 * MICRO_BATCHES),
            "train.seq-length": "32",
            "train.device": "cpu",
            "data.max-bytes": "100000",
            "data.cache-dir": str(cache_dir),
            "model.num-layers": str(MOE_LAYERS),
            "model.hidden-size": "32",
            "model.num-attention-heads": "4",
            "model.ffn-hidden-size": "64",
            "moe.num-experts": "4",
            "moe.router-topk": "2",
            "moe.router-type": "example_random",
            "optimizer.lr": "1e-2",
            "optimizer.lr-warmup-iters": "1",
            "logger.log-interval": "1000",
        },
        manager=manager,
    )


def test_a_config_selects_the_example_router_and_the_model_trains(
    manager: PluginManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mcore_example_router.router import RandomRouter

    config = _config(manager, tmp_path)
    assert config.moe.router_type == "example_random"
    assert manager.registries.get("router", "example_random") is RandomRouter

    routed: list[tuple[int, torch.Tensor]] = []
    forward = RandomRouter.forward

    def spy(self, hidden, replay_indices=None):
        out = forward(self, hidden, replay_indices)
        routed.append((self.layer_number, out.indices))
        return out

    monkeypatch.setattr(RandomRouter, "forward", spy)
    losses = train(config, manager=manager).losses

    assert len(routed) == STEPS * MICRO_BATCHES * MOE_LAYERS, "every MoE forward routes here"
    assert {layer for layer, _ in routed} == set(range(MOE_LAYERS))
    for _, indices in routed:  # two distinct experts of four for each of 2 x 32 tokens
        assert indices.shape == (64, 2)
        assert (indices[:, 0] != indices[:, 1]).all()
    # Random routing spreads tokens over all experts, layer by layer.
    assert torch.cat([i for _, i in routed]).unique().tolist() == [0, 1, 2, 3]
    assert len(losses) == STEPS
    assert losses[-1] < losses[0] - 1.0, f"the loss did not fall: {losses}"


def test_the_router_is_reproducible_per_layer_and_honours_replay(manager) -> None:
    from mcore.models import ModelContext, TransformerConfig
    from mcore.moe import MoEConfig

    Router = manager.registries.get("router", "example_random")
    ctx = ModelContext(
        TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2, vocab_size=64),
        registries=manager.registries,
    )
    moe = MoEConfig(num_experts=8, router_topk=2, router_type="example_random")
    hidden = torch.randn(16, 16)

    first = Router(ctx, moe, layer_number=0)(hidden)
    assert first.probs.dtype == torch.float32
    assert (first.probs == 0.5).all()
    assert first.scores is None and first.logits is None
    assert torch.equal(Router(ctx, moe, layer_number=0)(hidden).indices, first.indices)
    assert not torch.equal(Router(ctx, moe, layer_number=1)(hidden).indices, first.indices)

    replayed = Router(ctx, moe, layer_number=5)(hidden, replay_indices=first.indices)
    assert torch.equal(replayed.indices, first.indices)
    with pytest.raises(ValueError, match="recorded indices have shape"):
        Router(ctx, moe, layer_number=0)(hidden, replay_indices=first.indices[:3])
