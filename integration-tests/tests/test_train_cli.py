"""``mcore train`` as a user runs it: local ranks launched by the command itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
    assert sorted(p.name for p in save.glob("*.pt")) == ["model_rank00000.pt", "model_rank00001.pt"]
    assert f"checkpoint: {save}" in result.stdout


def test_mcore_train_reports_bad_config_before_launching(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "mcore"), "train", "--train.micro-batch-size", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "train.micro_batch_size: must be > 0, got 0" in result.stderr
