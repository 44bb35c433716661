"""Refit: weights from a training layout (TP, PP, FSDP and data-parallel replicas) into the
engine, whole or in the training layout, equal the model the same seed builds in one process;
an engine in the training layout (TP shards, pipeline stages) is filled from each rank's own
shards, by name, and refuses a copy whose names do not match one to one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mcore.core import McoreError, get_plugin_manager, load_config
from mcore.core.testing import run_ranks
from mcore.parallel.sharding import is_dtensor, model_sharded_tensors, unwrap
from megatron_rl.inference import build_engine, engine_layout, single_process_state
from megatron_rl.refit import (
    copy_local_weights,
    gather_full_state_dict,
    local_weights,
    refit_engine,
)


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


def _sharded_refit_on_ranks(rank: int, world_size: int, overrides: dict[str, str]) -> dict:
    config = load_config(overrides=overrides)
    manager = get_plugin_manager()
    runtime = manager.hook.mcore_training_runtime(config=config)
    torch.manual_seed(config.train.seed)
    chunks, _, _ = runtime.build(config, config.model, manager.registries)
    _as_if_trained(chunks)
    layout = engine_layout(runtime)
    assert layout.sharded and not layout.reason
    tokenizer = manager.registries.get("tokenizer", "char")(config)
    engine = build_engine(
        config, config.model, tokenizer, manager.registries,
        device=torch.device("cpu"), max_requests=2, max_sequence_length=32, layout=layout,
    )  # fmt: skip
    # What refit copies from: views of the training model's own storage, or, for a fully
    # sharded parameter, its data-parallel gather: never a tensor larger than the rank's shard.
    training = {
        (t.to_local() if is_dtensor(t) else t).untyped_storage().data_ptr()
        for t in chunks[0].state_dict().values()
    }
    engine_state = engine.model.state_dict()
    gathered = 0
    for bucket in local_weights(chunks[0], bucket_mb=0.01):
        for name, tensor in bucket.items():
            assert tensor.shape == engine_state[name].shape, name
            gathered += tensor.untyped_storage().data_ptr() not in training
    refit_engine(engine, chunks, sharded=True, bucket_mb=0.01)
    pieces = {
        key: [(view.detach().clone(), offset) for view, offset in sharded.pieces]
        for key, sharded in model_sharded_tensors([engine.model]).items()
    }
    ps = runtime.parallel_state
    return {
        "pieces": pieces,
        "gathered": gathered,
        "engines": layout.engines,
        "reports": layout.reports,
        "stage": ps.pp_rank,
        "layers": sorted(layer.layer_number for layer in engine.model.layers.values()),
        "training_layers": sorted(int(n) for n in unwrap(chunks[0]).layers),
        "numel": _numel(engine.model),
        "training_numel": _numel(chunks[0]),
    }


def _numel(model) -> int:
    """Elements of the tensors ``model`` holds on this rank (rotary frequencies left out)."""
    state = unwrap(model).state_dict()
    return sum(t.numel() for k, t in state.items() if not k.endswith("inv_freq"))


@pytest.mark.parametrize(
    "layout",
    [
        {"parallel.tp": "2"},
        {"parallel.tp": "2", "parallel.sequence-parallel": "true"},
        {"train.data-parallel": "megatron_fsdp"},
        {"parallel.pp": "2"},
        {"parallel.tp": "2", "parallel.pp": "2"},
    ],
    ids=["tp2", "tp2-sp", "fsdp-dp2", "pp2", "tp2-pp2"],
)
def test_refit_into_the_training_layout_copies_each_ranks_shards(layout, tiny_overrides) -> None:
    overrides = {**tiny_overrides, "model.vocab-size": "128", **layout}
    tp, pp = int(layout.get("parallel.tp", "1")), int(layout.get("parallel.pp", "1"))
    world = max(2, tp * pp)
    results = run_ranks(_sharded_refit_on_ranks, world, overrides, backend="gloo")
    oracle = _oracle(overrides)
    # One engine per model replica, reported by one of its ranks.
    assert sum(r["reports"] for r in results) == results[0]["engines"] == world // (tp * pp)
    if pp > 1:  # each stage's engine holds that stage's layers, as training numbers them
        assert {r["stage"]: r["layers"] for r in results} == {0: [0], 1: [1]}
        for result in results:
            assert result["layers"] == result["training_layers"]
            assert result["numel"] == result["training_numel"]
            # The last stage's own copy of the tied word embeddings arrived too.
            assert "embedding.weight" in result["pieces"]
    for result in results:
        held = whole = 0
        for key, pieces in result["pieces"].items():
            for view, offset in pieces:
                piece = oracle[key]
                for dim, (start, length) in enumerate(zip(offset, view.shape, strict=True)):
                    piece = piece.narrow(dim, start, length)
                torch.testing.assert_close(view, piece, rtol=0, atol=0, msg=key)
            held += sum(view.numel() for view, _ in pieces)
            whole += oracle[key].numel()
        if tp == 2:  # the engine split over the TP group: each rank holds its shards only
            assert held < 0.6 * whole
            assert result["gathered"] == 0  # every tensor copied straight from training's
        elif pp == 2:  # a stage's tensors, whole, copied straight from training's
            assert held == whole and result["gathered"] == 0
        else:  # fully sharded over data-parallel ranks: gathered there, a tensor at a time
            assert held == whole and result["gathered"] > 0


def _layout(vp_size: int | None = None, **sizes: int) -> SimpleNamespace:
    ps = dict(tp_size=1, pp_size=1, ep_size=1, etp_size=None, dp_size=1, world_size=4)
    ps.update(rank=0, tp_rank=0, pp_rank=0, dp_rank=0)
    ps.update(sizes)
    ps["etp_size"] = ps["etp_size"] or ps["tp_size"]
    return SimpleNamespace(parallel_state=SimpleNamespace(**ps), vp_size=vp_size)


def test_engines_keep_the_whole_model_where_they_cannot_run_the_training_layout() -> None:
    assert engine_layout(_layout(tp_size=2, dp_size=2)).sharded
    assert engine_layout(_layout(tp_size=4, ep_size=2, etp_size=2)).sharded  # experts in TP
    # One engine per data-parallel rank over its TP and PP ranks; its first rank reports.
    pp = engine_layout(_layout(pp_size=2, dp_size=2, dp_rank=1, rank=1))
    assert pp.sharded and (pp.engines, pp.engine_rank, pp.reports) == (2, 1, True)
    later = engine_layout(_layout(tp_size=2, pp_size=2, tp_rank=1, pp_rank=1, rank=3))
    assert later.sharded and (later.engines, later.reports) == (1, False)
    for sizes, reason in [
        (dict(pp_size=2, vp_size=2), "virtual pipeline stages"),
        (dict(ep_size=2, etp_size=1), "experts are split over ranks outside"),
    ]:
        layout = engine_layout(_layout(**sizes))
        assert not layout.sharded and reason in layout.reason
        assert (layout.engines, layout.engine_rank) == (4, 0)  # one engine per rank
    assert not engine_layout(_layout(tp_size=2), "whole").sharded


def test_a_copy_whose_tensors_do_not_match_training_is_refused_by_name(tiny_overrides) -> None:
    """Refit into the training layout copies by name: a tensor without its counterpart (here
    a layer only the engine has) stops it before anything is copied."""
    registries = get_plugin_manager().registries
    build = registries.get("model", "gpt")

    def model(layers: str):
        overrides = {**tiny_overrides, "model.vocab-size": "128", "model.num-layers": layers}
        config = load_config(overrides=overrides)
        return build(config.model, single_process_state(), sections=config,
                     registries=registries)  # fmt: skip

    training, engine = model("2"), model("3")
    before = {k: v.clone() for k, v in engine.state_dict().items()}
    with pytest.raises(McoreError, match=r"the engine's \['layers\.2\."):
        copy_local_weights(engine, training)
    for key, value in engine.state_dict().items():  # nothing was copied
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
