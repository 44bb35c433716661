"""Refit: weights from a training layout (TP, PP, and data-parallel replicas) into the
engine's single-process model equal the model the same seed builds in one process."""

from __future__ import annotations

import pytest
import torch

from mcore.core import get_plugin_manager, load_config
from mcore.core.testing import run_ranks
from mcore.parallel.sharding import model_sharded_tensors
from megatron_rl.inference import build_engine, single_process_state
from megatron_rl.refit import gather_full_state_dict, refit_engine


@torch.no_grad()
def _as_if_trained(chunks: list) -> None:
    """Move every weight by a function of its *global* position, whatever the layout."""
    for sharded in model_sharded_tensors(chunks).values():
        if not sharded.dtype.is_floating_point:
            continue
        n = 1
        for d in sharded.global_shape:
            n *= d
        delta = torch.sin(torch.arange(n, dtype=torch.float64)).view(sharded.global_shape) / 10
        for view, offset in sharded.pieces:
            piece = delta
            for dim, (start, length) in enumerate(zip(offset, view.shape, strict=True)):
                piece = piece.narrow(dim, start, length)
            view.add_(piece.to(view.dtype))


def _refit_on_ranks(rank: int, world_size: int, overrides: dict[str, str]) -> dict:
    config = load_config(overrides=overrides)
    manager = get_plugin_manager()
    runtime = manager.hook.mcore_training_runtime(config=config)
    torch.manual_seed(config.train.seed)
    chunks, _, _ = runtime.build(config, config.model, manager.registries)
    _as_if_trained(chunks)
    full = gather_full_state_dict(chunks)
    tokenizer = manager.registries.get("tokenizer", "char")(config)
    engine = build_engine(
        config, config.model, tokenizer, manager.registries,
        device=torch.device("cpu"), max_requests=2, max_sequence_length=32,
    )  # fmt: skip
    count = refit_engine(engine, chunks)
    engine_state = {k: v.clone() for k, v in engine.model.state_dict().items()}
    # The engine equals every piece this rank trains, where it sits in the global tensor.
    for key, sharded in model_sharded_tensors(chunks).items():
        for view, offset in sharded.pieces:
            piece = engine_state[key]
            for dim, (start, length) in enumerate(zip(offset, view.shape, strict=True)):
                piece = piece.narrow(dim, start, length)
            torch.testing.assert_close(piece, view.detach(), rtol=0, atol=0)
    return {
        "full": full,
        "engine": engine_state,
        "count": count,
        "pp_rank": runtime.parallel_state.pp_rank,
    }


def _oracle(overrides: dict[str, str]) -> dict[str, torch.Tensor]:
    config = load_config(overrides={**overrides, "parallel.tp": "1", "parallel.pp": "1"})
    manager = get_plugin_manager()
    torch.manual_seed(config.train.seed)
    build = manager.registries.get("model", "gpt")
    model = build(
        config.model, single_process_state(), sections=config, registries=manager.registries
    )
    _as_if_trained([model])
    return model.state_dict()


@pytest.mark.parametrize(
    "layout",
    [
        {"parallel.tp": "2"},
        {"parallel.pp": "2"},
    ],
    ids=["tp2", "pp2"],
)
def test_refit_from_training_layouts_equals_the_single_process_model(
    layout, tiny_overrides
) -> None:
    overrides = {**tiny_overrides, "model.vocab-size": "128", **layout}
    results = run_ranks(_refit_on_ranks, 2, overrides, backend="gloo")
    oracle = {k: v for k, v in _oracle(overrides).items() if not k.endswith("inv_freq")}
    for result in results:
        full = {k: v for k, v in result["full"].items() if not k.endswith("inv_freq")}
        assert full.keys() == oracle.keys()
        for key, value in oracle.items():
            torch.testing.assert_close(full[key], value, rtol=0, atol=0, msg=key)
            torch.testing.assert_close(result["engine"][key], value, rtol=0, atol=0, msg=key)
