"""``--model.cross-entropy-loss-fusion true``: ``mcore train`` with the chunked output layer and
cross-entropy gives the unfused loss curve, in one process (with multi-token prediction too,
whose depths' losses take the same path) and under TP2 with sequence parallelism."""

from __future__ import annotations

import pytest

from mcore.core import load_config
from mcore.core.testing import run_ranks
from mcore.core.training.loop import train

STEPS = 4
FUSED = {
    "model.cross-entropy-loss-fusion": "true",
    # 2 x 32 = 64 tokens a micro-batch: chunks of 24, 24 and 16.
    "model.cross-entropy-chunk-tokens": "24",
}


def config(cache_dir: str, **overrides: str):
    base = {
        "train.train-iters": str(STEPS),
        "train.micro-batch-size": "2",
        "train.global-batch-size": "4",
        "train.seq-length": "32",
        "data.max-bytes": "100000",
        "data.cache-dir": cache_dir,
        "model.num-layers": "2",
        "model.hidden-size": "32",
        "model.num-attention-heads": "4",
        "optimizer.lr": "2e-3",
        "logger.log-interval": "1000",
    }
    return load_config(overrides={**base, **overrides})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("data-cache"))
    return cache, train(config(cache)).losses


def test_fused_loss_curve_matches_unfused_in_one_process(reference) -> None:
    cache, expected = reference
    assert len(expected) == STEPS
    assert train(config(cache, **FUSED)).losses == pytest.approx(expected, rel=1e-5)


def test_fused_loss_curve_matches_unfused_with_multi_token_prediction(reference) -> None:
    cache, _ = reference
    mtp = {"model.mtp-num-layers": "1"}
    expected = train(config(cache, **mtp)).losses
    assert train(config(cache, **mtp, **FUSED)).losses == pytest.approx(expected, rel=1e-5)


def _run(rank, world, cache, overrides):
    return train(config(cache, **overrides)).losses


def test_fused_loss_curve_under_tp2_with_sequence_parallelism_matches_one_process(
    reference,
) -> None:
    cache, expected = reference
    layout = {"parallel.tp": "2", "parallel.sequence-parallel": "true", **FUSED}
    for curve in run_ranks(_run, 2, cache, layout, backend="gloo", timeout_s=300):
        assert curve == pytest.approx(expected, rel=1e-5)
