"""``mcore train``'s loop gives the same loss curve on one process and under DP, TP, CP, PP,
DP x TP and the distributed optimizer (fp32, gloo ranks)."""

from __future__ import annotations

import math

import pytest

from mcore.core import load_config
from mcore.core.testing import run_ranks
from mcore.core.training.loop import train

STEPS = 20


def config(cache_dir: str, **overrides: str):
    base = {
        "train.train-iters": str(STEPS),
        "train.micro-batch-size": "2",
        "train.global-batch-size": "8",
        "train.seq-length": "32",
        "data.max-bytes": "100000",
        "data.cache-dir": cache_dir,
        "model.num-layers": "2",
        "model.hidden-size": "32",
        "model.num-attention-heads": "4",
        "model.num-query-groups": "2",
        "model.ffn-hidden-size": "64",
        "logger.log-interval": "1000",
        "optimizer.lr": "1e-3",
        "optimizer.lr-warmup-iters": "2",
    }
    return load_config(overrides={**base, **overrides})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("data-cache"))
    return cache, train(config(cache)).losses


def _run(rank, world, cache, overrides):
    return train(config(cache, **overrides)).losses


LAYOUTS = {
    "dp2": (2, {}),
    "tp2": (2, {"parallel.tp": "2"}),
    "tp2_sp": (2, {"parallel.tp": "2", "parallel.sequence-parallel": "true"}),
    "pp2_1f1b": (2, {"parallel.pp": "2"}),
    "cp2": (2, {"parallel.cp": "2"}),
    "pp2_interleaved": (2, {"parallel.pp": "2", "parallel.vpp": "2", "model.num-layers": "4"}),
    "pp2_uneven": (
        2,
        {
            "parallel.pp": "2",
            "model.num-layers": "3",
            "model.num-layers-in-first-pipeline-stage": "2",
        },
    ),
    "dp2_tp2": (4, {"parallel.tp": "2"}),
    "dp2_distributed_optimizer": (2, {"optimizer.use-distributed-optimizer": "true"}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_loss_curve_matches_one_process(reference, layout) -> None:
    cache, expected = reference
    world, overrides = LAYOUTS[layout]
    model_overrides = {k: v for k, v in overrides.items() if k.startswith("model.")}
    if model_overrides:  # the layout needs another model: its own single-process reference
        expected = train(config(cache, **model_overrides)).losses
    curves = run_ranks(_run, world, cache, overrides, backend="gloo", timeout_s=300)
    assert len(expected) == STEPS and expected[-1] < expected[0]
    for curve in curves:  # every rank reports the same, globally reduced loss
        assert curve == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(reference, precision) -> None:
    cache, fp32 = reference
    result = train(config(cache, **{f"train.{precision}": "true"}))
    assert all(map(math.isfinite, result.losses))
    assert result.losses[-1] < result.losses[0] - 0.2
    # Low precision follows the fp32 curve closely on this tiny model.
    assert result.losses[-1] == pytest.approx(fp32[-1], abs=0.1)


def test_plugins_observe_the_loop_through_lifecycle_hooks(reference, tmp_path) -> None:
    from mcore.core import PluginManager, hookimpl

    calls: list[tuple] = []

    class Observer:
        @hookimpl
        def mcore_on_train_start(self, trainer):
            calls.append(("start",))

        @hookimpl
        def mcore_on_step_end(self, trainer, step, metrics):
            calls.append(("step", step, round(metrics["loss"], 6)))

        @hookimpl
        def mcore_on_checkpoint_saved(self, trainer, path):
            calls.append(("saved", path))

        @hookimpl
        def mcore_on_train_end(self, trainer):
            calls.append(("end",))

    cache, _ = reference
    manager = PluginManager().load_entry_points()
    manager.register(Observer(), name="observer")
    save = str(tmp_path / "run")
    cfg = config(cache, **{"train.train-iters": "3", "checkpoint.save": save})
    result = train(cfg, manager=manager)
    steps = [("step", i + 1, round(loss, 6)) for i, loss in enumerate(result.losses)]
    assert calls == [("start",), *steps, ("saved", f"{save}/iter_0000003"), ("end",)]
