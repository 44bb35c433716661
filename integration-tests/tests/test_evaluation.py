"""``train.eval_interval`` / ``train.eval_iters``: ``mcore train`` evaluates on the validation
split every N steps, forward only, in every layout; the figures reach the console,
metrics.jsonl and ``mcore plot``; evaluating does not change training. And
``logger.log_level`` decides which of mcore's log records show."""

from __future__ import annotations

import json
import math

import pytest

from mcore.core import McoreError, load_config
from mcore.core.testing import run_ranks
from mcore.core.training.loop import train
from mcore.core.training.plot import plot_metrics

STEPS = 6


def config(cache_dir: str, **overrides: str):
    base = {
        "train.train-iters": str(STEPS),
        "train.micro-batch-size": "2",
        "train.global-batch-size": "4",
        "train.seq-length": "32",
        "train.eval-interval": "3",
        "train.eval-iters": "2",
        "data.max-bytes": "100000",
        "data.cache-dir": cache_dir,
        "model.num-layers": "2",
        "model.hidden-size": "32",
        "model.num-attention-heads": "4",
        "optimizer.lr": "2e-3",
        "logger.log-interval": "1000",
    }
    return load_config(overrides={**base, **overrides})


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("data-cache"))
    metrics = tmp_path_factory.mktemp("run") / "metrics.jsonl"
    result = train(config(cache, **{"logger.metrics-file": str(metrics)}))
    return cache, result.losses, _rows(metrics), metrics


def test_every_interval_evaluates_and_the_figures_reach_the_logs(reference, tmp_path) -> None:
    _, _, rows, metrics = reference
    # Logged although log_interval is 1000: the evaluating steps, 3 and 6.
    assert [r["step"] for r in rows] == [3, 6]
    for row in rows:
        assert row["valid_loss"] > 0
        assert row["valid_ppl"] == pytest.approx(math.exp(row["valid_loss"]))
    assert rows[0]["valid_loss"] != rows[1]["valid_loss"]  # the model (and the batches) moved
    drawn = plot_metrics(metrics, tmp_path / "curves.png")
    assert "valid_loss" in drawn and (tmp_path / "curves.png").stat().st_size > 0


def test_evaluation_does_not_change_training(reference) -> None:
    cache, losses, _, _ = reference
    plain = train(config(cache, **{"train.eval-interval": "1000"})).losses
    assert plain == losses  # no eval step ran: same data, same RNG, same updates


def _run(rank, world, cache, overrides, metrics):
    train(config(cache, **overrides, **{"logger.metrics-file": metrics}))


@pytest.mark.parametrize(
    "layout",
    [{"parallel.tp": "2"}, {"parallel.pp": "2"}, {"train.global-batch-size": "4"}],
    ids=["tp2", "pp2", "dp2"],
)
def test_validation_loss_is_the_same_in_every_layout(reference, layout, tmp_path) -> None:
    cache, _, rows, _ = reference
    metrics = str(tmp_path / "metrics.jsonl")
    run_ranks(_run, 2, cache, layout, metrics, backend="gloo", timeout_s=300)
    got = _rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in got] == [3, 6]
    for mine, want in zip(got, rows, strict=True):
        assert mine["valid_loss"] == pytest.approx(want["valid_loss"], rel=1e-5)


def test_evaluation_runs_without_dropout(reference, tmp_path) -> None:
    """With a learning rate too small to move the weights, the validation loss with dropout
    0.5 in the model equals the one without: evaluation runs in eval mode."""
    cache = reference[0]
    frozen = {"optimizer.lr": "1e-12", "optimizer.min-lr": "0", "train.train-iters": "3"}
    figures = []
    for dropout in ("0.0", "0.5"):
        metrics = tmp_path / f"dropout-{dropout}.jsonl"
        train(config(cache, **frozen, **{"model.hidden-dropout": dropout,
                                         "logger.metrics-file": str(metrics)}))  # fmt: skip
        figures.append(_rows(metrics)[0]["valid_loss"])
    assert figures[1] == pytest.approx(figures[0], rel=1e-5)


def test_an_empty_validation_split_is_refused_by_name(tmp_path) -> None:
    with pytest.raises(McoreError, match="train.eval_interval is 3, but the validation split"):
        train(config(str(tmp_path), **{"data.split": "100,0,0"}))


@pytest.mark.parametrize(("level", "shown"), [("info", True), ("warning", False)])
def test_log_level_decides_which_records_show(reference, caplog, level, shown) -> None:
    cache = reference[0]
    overrides = {"train.train-iters": "1", "train.eval-interval": "1000",
                 "logger.log-level": level}  # fmt: skip
    train(config(cache, **overrides))
    started = [r for r in caplog.records if r.getMessage().startswith("training steps 1-1")]
    assert bool(started) == shown
