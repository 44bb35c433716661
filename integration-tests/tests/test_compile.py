"""``train.compile``: regional compilation gives the eager loss curve in every layout.

One single-process run compiles with inductor (kernels generated for this CPU); the layouts
(TP with sequence parallelism, PP, CP, EP with MoE, megatron-fsdp, recompute) compile with
``aot_eager``, which traces every region through dynamo and AOT autograd exactly as inductor
would see it but skips kernel generation, so the suite can afford them. ``auto`` stays eager on
CPU with one log line; a region that fails to compile runs eagerly.
"""

from __future__ import annotations

import logging

import pytest
import torch

from mcore.core import PluginManager, hookimpl, load_config
from mcore.core.testing import run_ranks
from mcore.core.training.loop import train

STEPS = 4


def config(cache: str, **overrides: str):
    base = {
        "train.train-iters": str(STEPS),
        "train.micro-batch-size": "2",
        "train.global-batch-size": "4",
        "train.seq-length": "32",
        "data.max-bytes": "100000",
        "data.cache-dir": cache,
        "model.num-layers": "2",
        "model.hidden-size": "32",
        "model.num-attention-heads": "4",
        "model.num-query-groups": "2",
        "optimizer.lr": "3e-3",
        "logger.log-interval": "1000",
    }
    return load_config(overrides={**base, **overrides})


class _StillCompiled:
    """Counts, at the end of a run, the layers that still run compiled (none fell back)."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    @hookimpl
    def mcore_on_train_end(self, trainer):
        regions = [
            m for c in trainer.chunks for m in c.modules() if getattr(type(m), "compile_region", 0)
        ]
        self.counts = [sum(m._compiled_call_impl is not None for m in regions), len(regions)]


def _losses(rank, world, cache, overrides):
    """The run's losses, and [layers still compiled, layers]."""
    import torch._dynamo

    torch._dynamo.reset()
    manager = PluginManager().load_entry_points()
    probe = _StillCompiled()
    manager.register(probe, name="probe")
    return train(config(cache, **overrides), manager=manager).losses, probe.counts


LAYOUTS = {
    "tp2_sp": {"parallel.tp": "2", "parallel.sequence-parallel": "true"},
    "pp2": {"parallel.pp": "2"},
    "cp2": {"parallel.cp": "2"},
    "ep2_moe": {"parallel.ep": "2", "moe.num-experts": "4", "moe.router-topk": "2"},
    "fsdp": {"train.data-parallel": "megatron_fsdp"},
    "recompute": {"model.recompute-granularity": "full"},
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def eager(cache) -> dict[str, list[float]]:
    """Eager curves of one process: dense, and MoE for the expert-parallel layout (each layout's
    eager curve equals these: test_training_parity and test_moe_training show it)."""
    moe = {k: v for k, v in LAYOUTS["ep2_moe"].items() if k.startswith("moe.")}
    return {
        "dense": _losses(0, 1, cache, {"train.compile": "off"})[0],
        "moe": _losses(0, 1, cache, {**moe, "train.compile": "off"})[0],
    }


def test_inductor_compiled_layers_give_the_eager_curve(cache, eager, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="mcore.parallel.compile"):
        compiled, still = _losses(0, 1, cache, {"train.compile": "on"})
    assert "train.compile: 2 regions compiled (backend inductor)" in caplog.text
    assert still == [2, 2]
    # Generated kernels fuse and reorder fp32 arithmetic: equal up to rounding.
    assert compiled == pytest.approx(eager["dense"], rel=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_every_layout_composes_with_compiled_layers(cache, eager, layout) -> None:
    overrides = {**LAYOUTS[layout], "train.compile": "on", "train.compile-backend": "aot_eager"}
    results = run_ranks(_losses, 2, cache, overrides, backend="gloo", timeout_s=600)
    expected = eager["moe" if "moe.num-experts" in overrides else "dense"]
    for losses, (compiled, layers) in results:
        assert compiled == layers > 0  # every layer of the rank ran compiled to the end
        assert losses == pytest.approx(expected, rel=1e-5)


def test_auto_stays_eager_on_cpu_and_says_so(cache, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="mcore.parallel.compile"):
        _, still = _losses(0, 1, cache, {"train.train-iters": "1"})
    assert still == [0, 2]
    assert "train.compile auto: layers run eagerly on cpu" in caplog.text


def test_a_region_that_fails_to_compile_runs_eagerly(caplog) -> None:
    from mcore.parallel.compile import compile_regions

    class Region(torch.nn.Linear):
        compile_region = True

    def broken_backend(graph, inputs):
        raise RuntimeError("no kernels today")

    model = torch.nn.Sequential(Region(4, 4), Region(4, 4))
    x = torch.randn(3, 4)
    expected = model(x)
    with caplog.at_level(logging.WARNING, logger="mcore.parallel.compile"):
        assert compile_regions([model], "on", broken_backend, torch.device("cpu")) == 2
        torch.testing.assert_close(model(x), expected)
        torch.testing.assert_close(model(x), expected)
    warnings = [r for r in caplog.records if "run eagerly, compiling failed" in r.getMessage()]
    assert len(warnings) == 1 and "no kernels today" in warnings[0].getMessage()
    assert all(m._compiled_call_impl is None for m in model)
