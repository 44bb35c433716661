"""``mcore train`` with multi-token prediction (DeepSeek-V3's MTP, two depths, MoE layers):
the loss curve under TP+SP, PP (tied and untied embeddings), EP, CP, megatron-fsdp and the
distributed optimizer with recompute equals one process; the MTP loss factor trains the model
(0 leaves the LM curve of a model without MTP); each depth's loss reaches the metrics."""

from __future__ import annotations

import json

import pytest

from mcore.core import ConfigError, load_config
from mcore.core.testing import run_ranks
from mcore.core.training.loop import train

STEPS = 20


def config(cache_dir: str, **overrides: str | None):
    """The run's config; an override of None removes that key from the base."""
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
        "model.mtp-num-layers": "2",
        "model.mtp-loss-scaling-factor": "0.3",
        "moe.num-experts": "4",
        "moe.router-topk": "2",
        "moe.ffn-hidden-size": "32",
        "moe.first-k-dense": "1",
        "optimizer.lr": "2e-3",
        "optimizer.lr-warmup-iters": "2",
        "optimizer.clip-grad": "1.0",
        "logger.log-interval": "1000",
    }
    merged = {**base, **overrides}
    return load_config(overrides={k: v for k, v in merged.items() if v is not None})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("data-cache"))
    return cache, train(config(cache)).losses


def _run(rank, world, cache, overrides):
    return train(config(cache, **overrides)).losses


LAYOUTS = {
    "tp2_sp": (2, {"parallel.tp": "2", "parallel.sequence-parallel": "true"}),
    "pp2_tied": (2, {"parallel.pp": "2"}),
    "pp2_untied": (2, {"parallel.pp": "2", "model.untie-embeddings-and-output-weights": "true"}),
    "ep2": (2, {"parallel.ep": "2"}),
    "cp2": (2, {"parallel.cp": "2"}),
    "megatron_fsdp": (
        2,
        {
            "train.data-parallel": "megatron_fsdp",
            "fsdp.data-parallel-sharding-strategy": "optim_grads_params",
        },
    ),
    "dp2_distributed_optimizer_recompute": (
        2,
        {"optimizer.use-distributed-optimizer": "true", "model.recompute-granularity": "full"},
    ),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_mtp_loss_curve_matches_one_process(reference, layout) -> None:
    cache, expected = reference
    world, overrides = LAYOUTS[layout]
    if "untied" in layout:  # its own single-process reference
        expected = train(config(cache, **overrides_without_parallel(overrides))).losses
    curves = run_ranks(_run, world, cache, overrides, backend="gloo", timeout_s=600)
    assert len(expected) == STEPS and expected[-1] < expected[0] - 0.5
    for curve in curves:
        assert curve == pytest.approx(expected, rel=1e-5)


def overrides_without_parallel(overrides: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in overrides.items() if not k.startswith("parallel.")}


def test_the_mtp_loss_factor_trains_the_model(reference) -> None:
    """Factor 0: the MTP depths get no gradient and the LM curve is a model's without MTP
    (the main weights are drawn alike either way); the default factor changes the curve."""
    cache, with_mtp = reference
    no_mtp = {"model.mtp-num-layers": "0", "model.mtp-loss-scaling-factor": None}
    without = train(config(cache, **no_mtp)).losses
    zero = train(config(cache, **{"model.mtp-loss-scaling-factor": "0"})).losses
    assert zero == pytest.approx(without, rel=1e-6)
    assert abs(with_mtp[-1] - without[-1]) > 1e-3


def test_each_depth_loss_reaches_the_metrics(reference, tmp_path) -> None:
    cache, _ = reference
    metrics_file = tmp_path / "metrics.jsonl"
    overrides = {
        "train.train-iters": "3",
        "logger.metrics-file": str(metrics_file),
        "logger.log-interval": "1",
    }
    train(config(cache, **overrides))
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        # Depth k predicts k + 1 tokens ahead: harder, so a higher loss than the LM's.
        assert row["mtp_1_loss"] > row["loss"] - 0.5
        assert row["mtp_2_loss"] > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model.mtp-num-layers": "0"}, "mtp_loss_scaling_factor: is set"),
        (
            {"model.position-embedding-type": "learned_absolute"},
            "needs position_embedding_type 'rope' or 'none'",
        ),
        ({"model.mtp-num-layers": "-1"}, "mtp_num_layers: must be >= 0"),
    ],
)
def test_bad_mtp_settings_are_refused_naming_the_knob(overrides, message, tmp_path) -> None:
    with pytest.raises(ConfigError, match=message):
        config(str(tmp_path), **overrides)
