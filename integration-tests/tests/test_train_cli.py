"""``mcore train`` as a user runs it: local ranks launched by the command itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def test_mcore_train_launches_two_ranks_and_writes_a_checkpoint(tmp_path: Path) -> None:
    save = tmp_path / "run"
    result = subprocess.run(
        [
            str(BIN / "mcore"), "train", "--nproc", "2",
            "--train.train-iters", "6", "--train.micro-batch-size", "2",
            "--train.seq-length", "64", "--data.max-bytes", "100000",
            "--data.cache-dir", str(tmp_path / "cache"),
            "--model.num-layers", "2", "--model.hidden-size", "64",
            "--logger.log-interval", "1", "--optimizer.lr", "3e-3",
            "--checkpoint.save", str(save),
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    losses = [
        float(line.split("| loss ")[1].split()[0])
        for line in result.stdout.splitlines()
        if line.startswith("step ")
    ]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert (save / "latest").read_text().strip() == "iter_0000006"
    assert sorted(p.name for p in (save / "iter_0000006").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "common.json",
    ]  # fmt: skip
    assert f"checkpoint: {save / 'iter_0000006'}" in result.stdout
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "grad_norm", "lr", "tokens_per_s"} <= set(records[0])
    assert [r["loss"] for r in records] == pytest.approx(losses, abs=1e-4)
    plot = subprocess.run(
        [str(BIN / "mcore"), "plot", str(save / "metrics.jsonl")], capture_output=True, text=True
    )
    assert plot.returncode == 0, plot.stderr
    assert (save / "metrics.png").read_bytes().startswith(b"\x89PNG")


def test_mcore_train_reports_bad_config_before_launching(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "mcore"), "train", "--train.micro-batch-size", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "train.micro_batch_size: must be > 0, got 0" in result.stderr


def test_an_error_in_the_launched_ranks_is_one_line_not_a_launcher_traceback(
    tmp_path: Path,
) -> None:
    """The config is valid, but the ranks find the validation split empty: each prints its
    clean error, the launcher adds one line, and the exit code is the ranks'."""
    result = subprocess.run(
        [
            str(BIN / "mcore"), "train", "--nproc", "2", "--train.train-iters", "2",
            "--train.eval-interval", "1", "--data.split", "100,0,0",
            "--model.num-layers", "1", "--model.hidden-size", "32",
            "--data.max-bytes", "50000", "--data.cache-dir", str(tmp_path / "cache"),
            "--checkpoint.save", str(tmp_path / "run"),
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "the validation split is empty" in result.stderr
    assert "of 2 exited with code 2; its error is above" in result.stderr
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
