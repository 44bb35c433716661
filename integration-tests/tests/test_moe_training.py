"""``mcore train`` with MoE GPT models: the loss curve under expert parallelism equals one
expert-parallel rank, the balancing losses reach the logs, and the layout options combine."""

from __future__ import annotations

import json

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
        "model.ffn-hidden-size": "64",
        "moe.num-experts": "4",
        "moe.router-topk": "2",
        "moe.ffn-hidden-size": "32",
        "moe.aux-loss-coeff": "0.01",
        "moe.z-loss-coeff": "0.001",
        "moe.shared-expert-intermediate-size": "16",
        "logger.log-interval": "1000",
        "optimizer.lr": "2e-3",
        "optimizer.lr-warmup-iters": "2",
    }
    return load_config(overrides={**base, **overrides})


def _run(rank, world, cache, overrides):
    return train(config(cache, **overrides)).losses


@pytest.fixture(scope="module")
def ep1(tmp_path_factory):
    """The reference: two data-parallel ranks, every expert on each (EP = 1)."""
    cache = str(tmp_path_factory.mktemp("data-cache"))
    (curve, _) = run_ranks(_run, 2, cache, {}, backend="gloo", timeout_s=300)
    return cache, curve


LAYOUTS = {
    "ep2_alltoall": (2, {"parallel.ep": "2"}),
    "ep2_allgather": (2, {"parallel.ep": "2", "moe.token-dispatcher-type": "allgather"}),
    "ep2_distributed_optimizer": (
        2,
        {"parallel.ep": "2", "optimizer.use-distributed-optimizer": "true"},
    ),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_expert_parallel_loss_curve_equals_ep1(ep1, layout) -> None:
    cache, expected = ep1
    world, overrides = LAYOUTS[layout]
    curves = run_ranks(_run, world, cache, overrides, backend="gloo", timeout_s=300)
    assert len(expected) == STEPS and expected[-1] < expected[0] - 0.5
    for curve in curves:
        assert curve == pytest.approx(expected, rel=1e-5)


def _run_logged(rank, world, cache, metrics_file):
    overrides = {
        "parallel.ep": "2",
        "train.train-iters": "3",
        "logger.metrics-file": metrics_file,
        "logger.log-interval": "1",
        "moe.per-layer-logging": "true",
        "moe.router-enable-expert-bias": "true",
        "moe.router-score-function": "sigmoid",
        "moe.router-norm-topk-prob": "true",
    }
    return train(config(cache, **overrides)).losses


def test_balancing_losses_and_expert_load_reach_the_metrics(ep1, tmp_path) -> None:
    cache, _ = ep1
    metrics_file = str(tmp_path / "metrics.jsonl")
    run_ranks(_run_logged, 2, cache, metrics_file, backend="gloo", timeout_s=300)
    with open(metrics_file) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 3
    for key in (
        "moe/load_balancing_loss",
        "moe/z_loss",
        "moe/expert_load_imbalance",
        "moe/layer0/load_balancing_loss",
        "moe/layer1/expert_load_imbalance",
    ):
        assert key in rows[-1], sorted(rows[-1])
    assert rows[-1]["moe/load_balancing_loss"] >= 0.99  # 1 is perfect balance
    assert rows[-1]["moe/expert_load_imbalance"] >= 1.0
