"""``mcore rl`` as a user runs it: two local ranks launched by the command, metrics in the
run's metrics.jsonl, drawn by ``mcore plot``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parents[3] / "examples" / "rl" / "tiny_reverse.toml"


def _mcore(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mcore.core.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_mcore_rl_runs_the_example_on_two_ranks_and_plots(tmp_path: Path) -> None:
    save = tmp_path / "run"
    result = _mcore(
        "rl", str(EXAMPLE), "--nproc", "2", "--train.train-iters", "3", "--rl.sft-iters", "2",
        "--logger.log-interval", "1", "--checkpoint.save", str(save),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "step 2/2 | grad_norm" in result.stdout and "rl/sft_loss" in result.stdout
    assert "mean reward: step 1 " in result.stdout
    assert f"checkpoint: {save / 'iter_0000003'}" in result.stdout
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    wanted = {"loss", "rl/reward_mean", "rl/reward_std", "rl/kl", "rl/entropy", "rl/clip_fraction"}
    assert wanted | {"rl/rollout_tokens_per_s", "rl/train_tokens_per_s"} <= set(records[0])
    keys = "rl/reward_mean,rl/kl,rl/entropy,rl/clip_fraction,rl/rollout_tokens_per_s"
    plot = _mcore(
        "plot", str(save / "metrics.jsonl"), "--keys", keys, "-o", str(tmp_path / "p.png")
    )
    assert plot.returncode == 0, plot.stderr
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")


def test_mcore_rl_reports_bad_config_before_launching() -> None:
    result = _mcore("rl", "--rl.env", "chess", "--rl.group-size", "1", timeout=60)
    assert result.returncode == 2
    assert "rl.group_size: must be >= 2" in result.stderr
    bad_env = _mcore("rl", "--rl.env", "chess", timeout=60)
    assert bad_env.returncode == 2
    assert "rl.env: unknown rl env 'chess'. Known: arithmetic, math_answer, string_copy" in (
        bad_env.stderr
    )
