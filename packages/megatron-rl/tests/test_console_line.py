"""``mcore rl``'s per-step console line stays short; metrics.jsonl keeps every field."""

from __future__ import annotations

import io
import json

from mcore.core.training.metrics import MetricsLogger
from megatron_rl.loop import CONSOLE_KEYS


def test_the_console_line_shows_a_few_fields_and_the_file_all(tmp_path) -> None:
    metrics = {key: 1.0 for key in CONSOLE_KEYS}
    metrics.update({f"rl/other_{i}": float(i) for i in range(20)})
    stream, file = io.StringIO(), tmp_path / "metrics.jsonl"
    logger = MetricsLogger(metrics_file=file, tensorboard_dir=None, log_interval=1,
                           total_steps=3, progress_bar=False, stream=stream,
                           console_keys=CONSOLE_KEYS)  # fmt: skip
    logger.log(1, metrics)
    logger.close()
    (line,) = stream.getvalue().splitlines()
    assert len(line.split(" | ")) == 1 + len(CONSOLE_KEYS) <= 8  # "step 1/3" and the keys
    assert "rl/other" not in line and "rl/reward_mean 1" in line
    (row,) = [json.loads(text) for text in file.read_text().splitlines()]
    assert set(row) == {"step", *metrics}
