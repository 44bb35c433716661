"""``[profile]`` in a real ``mcore train`` run: the torch.profiler trace of the chosen steps
holds mcore's named ranges (step, forward, loss, backward, layer, grad-sync, optimizer), only
the chosen ranks write one, ``profile.nvtx_ranges`` marks every step, and start-up phases are
printed once and logged with the first record of metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mcore.core import load_config
from mcore.core.testing import run_ranks
from mcore.core.training.loop import train
from mcore.core.training.profiling import PHASES, StartupTimes, ranges

PHASE_KEYS = [key for key, _ in PHASES] + ["total"]


def config(cache_dir: str, **overrides: str):
    base = {
        "train.train-iters": "4",
        "train.micro-batch-size": "2",
        "train.global-batch-size": "4",
        "train.seq-length": "32",
        "data.max-bytes": "100000",
        "data.cache-dir": cache_dir,
        "model.num-layers": "2",
        "model.hidden-size": "32",
        "model.num-attention-heads": "4",
        "logger.log-interval": "1",
        "profile.profile-step-start": "2",
        "profile.profile-step-end": "4",
    }
    return load_config(overrides={**base, **overrides})


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("data-cache"))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _names(trace: Path) -> set[str]:
    return {e["name"] for e in json.loads(trace.read_text())["traceEvents"] if "name" in e}


def _check_startup(row: dict, *, one_rank: bool) -> None:
    for key in PHASE_KEYS:
        low, high = row[f"startup/{key}_min_s"], row[f"startup/{key}_max_s"]
        assert 0 <= low <= high <= row["startup/total_max_s"], (key, low, high)
        assert low == high or not one_rank
    if one_rank:  # the phases add up to the total (over ranks, maxima need not)
        phases = sum(row[f"startup/{key}_max_s"] for key, _ in PHASES)
        assert row["startup/total_max_s"] == pytest.approx(phases, rel=1e-6)


def test_the_trace_holds_the_chosen_steps_and_our_ranges(
    cache, tmp_path, capsys, monkeypatch
) -> None:
    # As in a new process: only a process's first train() times process start -> train().
    monkeypatch.setattr(StartupTimes, "_measured_in", None)
    metrics = tmp_path / "metrics.jsonl"
    overrides = {
        "profile.profile": "true",
        "profile.trace-dir": str(tmp_path / "traces"),
        "logger.metrics-file": str(metrics),
    }
    train(config(cache, **overrides))
    assert [p.name for p in (tmp_path / "traces").iterdir()] == ["rank0_steps2-3.json"]
    names = _names(tmp_path / "traces" / "rank0_steps2-3.json")
    ours = {"step 2", "step 3", "forward", "loss", "backward", "layer 0", "layer 1"}
    assert ours | {"grad-sync", "optimizer", "aten::mm"} <= names
    assert not {"step 1", "step 4"} & names  # the window is [start, end)
    assert not ranges.enabled  # off again after the run

    out = capsys.readouterr().out
    [line] = [line for line in out.splitlines() if line.startswith("startup")]
    assert line.startswith("startup: process->train ") and " first step " in line
    rows = _rows(metrics)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    _check_startup(rows[0], one_rank=True)
    assert not any(k.startswith("startup/") for r in rows[1:] for k in r)


def test_nvtx_ranges_mark_every_step_without_a_trace(cache, tmp_path) -> None:
    overrides = {
        "profile.nvtx-ranges": "true",
        "profile.trace-dir": str(tmp_path / "traces"),
        "train.train-iters": "2",  # the outer profiler records every op: keep it short
    }
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as outer:
        train(config(cache, **overrides))
    names = {event.key for event in outer.key_averages()}
    assert {"step 1", "step 2", "forward", "backward", "layer 0", "optimizer"} <= names
    assert not (tmp_path / "traces").exists()
    assert not ranges.enabled


def _run(rank: int, world: int, cache: str, trace_dir: str, metrics: str) -> None:
    overrides = {
        "profile.profile": "true",
        "profile.profile-ranks": "1",
        "profile.trace-dir": trace_dir,
        "logger.metrics-file": metrics,
        "train.train-iters": "3",
    }
    train(config(cache, **overrides))


def test_only_the_chosen_rank_writes_and_startup_spans_the_ranks(cache, tmp_path) -> None:
    traces, metrics = tmp_path / "traces", tmp_path / "metrics.jsonl"
    run_ranks(_run, 2, cache, str(traces), str(metrics), backend="gloo", timeout_s=120)
    # Three steps: the run ends inside the window [2, 4), and the trace holds what ran.
    assert [p.name for p in traces.iterdir()] == ["rank1_steps2-3.json"]
    assert {"step 2", "step 3", "grad-sync"} <= _names(traces / "rank1_steps2-3.json")
    _check_startup(_rows(metrics)[0], one_rank=False)
