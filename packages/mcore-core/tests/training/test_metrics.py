"""MetricsLogger as a training loop drives it: console lines, JSONL, progress bar, TensorBoard."""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import pytest

from mcore.core.errors import McoreError
from mcore.core.training import metrics as metrics_module
from mcore.core.training.metrics import MetricsLogger, NonFiniteLossError, check_finite


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as an interactive stdout does."""

    def isatty(self) -> bool:
        return True


def run(logger: MetricsLogger, steps: int) -> None:
    with logger:
        for step in range(1, steps + 1):
            logger.log(
                step,
                {
                    "loss": 4.0 / step,
                    "grad_norm": 0.5,
                    "lr": 3e-4,
                    "tokens_per_s": 1234.4,
                    "mfu": 0.123,
                },
            )


def test_one_line_per_interval_and_at_the_last_step(tmp_path: Path) -> None:
    out = io.StringIO()
    run(
        MetricsLogger(
            metrics_file=None,
            tensorboard_dir=None,
            log_interval=4,
            total_steps=10,
            progress_bar=True,  # not a terminal: no bar
            stream=out,
        ),
        10,
    )
    lines = out.getvalue().splitlines()
    assert [line.split(" |")[0] for line in lines] == ["step 4/10", "step 8/10", "step 10/10"]
    assert lines[0] == (
        "step 4/10 | loss 1.0000 | grad_norm 0.500 | lr 3.00e-04 | tokens/s 1234 | mfu 12.3%"
    )


def test_fields_show_only_when_given() -> None:
    out = io.StringIO()
    with MetricsLogger(
        metrics_file=None,
        tensorboard_dir=None,
        log_interval=1,
        total_steps=2,
        progress_bar=False,
        stream=out,
    ) as logger:
        logger.log(1, {"loss": 2.5})
        logger.log(2, {"loss": 2.0, "loss_scale": 65536.0})
    assert out.getvalue().splitlines() == [
        "step 1/2 | loss 2.5000",
        "step 2/2 | loss 2.0000 | loss_scale 6.554e+04",
    ]


def test_jsonl_gets_one_object_per_logged_step(tmp_path: Path) -> None:
    path = tmp_path / "run" / "metrics.jsonl"  # the folder does not exist yet
    run(
        MetricsLogger(
            metrics_file=str(path),
            tensorboard_dir=None,
            log_interval=5,
            total_steps=10,
            progress_bar=False,
            stream=io.StringIO(),
        ),
        10,
    )
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10]
    assert records[1] == {
        "step": 10,
        "loss": 0.4,
        "grad_norm": 0.5,
        "lr": 3e-4,
        "tokens_per_s": 1234.4,
        "mfu": 0.123,
    }


def test_jsonl_is_flushed_as_it_goes_and_appended_on_resume(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    kwargs = dict(tensorboard_dir=None, log_interval=1, total_steps=4, progress_bar=False)
    with MetricsLogger(metrics_file=path, stream=io.StringIO(), **kwargs) as logger:
        logger.log(1, {"loss": 1.0})
        assert json.loads(path.read_text()) == {"step": 1, "loss": 1.0}  # readable mid-run
    with MetricsLogger(metrics_file=path, stream=io.StringIO(), start_step=1, **kwargs) as logger:
        logger.log(2, {"loss": 0.5})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_other_ranks_write_nothing(tmp_path: Path) -> None:
    out = Terminal()
    path = tmp_path / "metrics.jsonl"
    run(
        MetricsLogger(
            metrics_file=str(path),
            tensorboard_dir=str(tmp_path / "tb"),  # not even an import is attempted
            log_interval=1,
            total_steps=3,
            progress_bar=True,
            rank=1,
            stream=out,
        ),
        3,
    )
    assert out.getvalue() == ""
    assert not path.exists()
    assert not (tmp_path / "tb").exists()


def test_progress_bar_on_a_terminal_keeps_log_lines_intact() -> None:
    out = Terminal()
    run(
        MetricsLogger(
            metrics_file=None,
            tensorboard_dir=None,
            log_interval=5,
            total_steps=10,
            progress_bar=True,
            stream=out,
        ),
        10,
    )
    text = out.getvalue()
    assert "\r" in text and "10/10" in text  # the bar drew itself and finished
    logged = [line for line in text.splitlines() if line.startswith("step ")]
    assert [line.split(" |")[0] for line in logged] == ["step 5/10", "step 10/10"]


def test_progress_bar_can_be_turned_off_on_a_terminal() -> None:
    out = Terminal()
    run(
        MetricsLogger(
            metrics_file=None,
            tensorboard_dir=None,
            log_interval=5,
            total_steps=10,
            progress_bar=False,
            stream=out,
        ),
        10,
    )
    assert "\r" not in out.getvalue()


class FakeWriter:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []
        self.closed = False

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def close(self) -> None:
        self.closed = True


def test_tensorboard_gets_the_logged_scalars(monkeypatch: pytest.MonkeyPatch) -> None:
    writer = FakeWriter()
    monkeypatch.setattr(metrics_module, "_summary_writer", lambda log_dir: writer)
    with MetricsLogger(
        metrics_file=None,
        tensorboard_dir="tb",
        log_interval=2,
        total_steps=2,
        progress_bar=False,
        stream=io.StringIO(),
    ) as logger:
        logger.log(1, {"loss": 3.0})
        logger.log(2, {"loss": 2.0, "lr": 1e-3})
    assert writer.scalars == [("train/loss", 2.0, 2), ("train/lr", 1e-3, 2)]
    assert writer.closed


def test_tensorboard_missing_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(McoreError, match="pip install tensorboard"):
        MetricsLogger(
            metrics_file=None,
            tensorboard_dir=str(tmp_path / "tb"),
            log_interval=1,
            total_steps=1,
            progress_bar=False,
        )


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_loss_stops_with_advice(bad: float) -> None:
    with pytest.raises(NonFiniteLossError) as caught:
        check_finite(42, bad)
    message = str(caught.value)
    assert f"loss is {bad} at step 42" in message
    for hint in ("--optimizer.lr", "--optimizer.clip-grad", "data"):
        assert hint in message
    assert isinstance(caught.value, McoreError)
    assert (caught.value.step, str(caught.value.value)) == (42, str(bad))


def test_a_finite_loss_passes() -> None:
    check_finite(1, 2.5)
    logger = MetricsLogger(
        metrics_file=None, tensorboard_dir=None, log_interval=1, total_steps=1, progress_bar=False
    )
    logger.check_finite(1, 0.0)
    with pytest.raises(NonFiniteLossError):
        logger.check_finite(2, math.nan)
    logger.close()
    logger.close()  # closing twice is fine
