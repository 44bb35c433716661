"""Where training metrics go: a progress bar, one console line per log interval, a JSONL file
and, optionally, TensorBoard. Only rank 0 writes; every other rank's logger does nothing.

    with MetricsLogger(metrics_file="run/metrics.jsonl", tensorboard_dir=None, log_interval=10,
                       total_steps=100, progress_bar=True, rank=rank) as logger:
        for step in range(1, 101):
            ...
            check_finite(step, loss)
            logger.log(step, {"loss": loss, "grad_norm": gn, "lr": lr, "tokens_per_s": tps})

Steps count from 1; step ``k`` is logged when ``k % log_interval == 0`` and at the last step.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from mcore.core.errors import McoreError

_PACKAGE_LOGGERS = ("mcore", "megatron_fsdp", "megatron_rl")


def configure_logging(level: str) -> None:
    """Show the ``logging`` records of mcore's packages at ``level`` (``logger.log_level``)
    and above; a program without logging handlers gets one on stderr, one that has its own
    keeps them."""
    for name in _PACKAGE_LOGGERS:
        logging.getLogger(name).setLevel(level.upper())
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")


class NonFiniteLossError(McoreError, FloatingPointError):
    """The loss became NaN or infinite; training stops before it spreads into the weights."""

    def __init__(self, step: int, value: float) -> None:
        super().__init__(
            f"loss is {value} at step {step}: stopping before the non-finite value reaches the "
            "weights. Try a lower learning rate (--optimizer.lr) or a longer warmup "
            "(--optimizer.lr-warmup-iters), keep gradient clipping on (--optimizer.clip-grad "
            "1.0), or check the data read around this step for empty or corrupt samples."
        )
        self.step = step
        self.value = value


def check_finite(step: int, loss: Any) -> None:
    """Raise ``NonFiniteLossError`` when ``loss`` (a float or 0-d tensor) is NaN or infinite."""
    value = float(loss)
    if not math.isfinite(value):
        raise NonFiniteLossError(step, value)


# How the console line shows the fields it knows, in this order; others follow as given.
_FIELDS: dict[str, tuple[str, str]] = {
    "loss": ("loss", "{:.4f}"),
    "grad_norm": ("grad_norm", "{:.3f}"),
    "lr": ("lr", "{:.2e}"),
    "tokens_per_s": ("tokens/s", "{:.0f}"),
}


def format_line(
    step: int,
    total_steps: int,
    metrics: dict[str, Any],
    keys: tuple[str, ...] | None = None,
) -> str:
    """``step 20/100 | loss 3.2145 | grad_norm 0.812 | lr 3.00e-04 | tokens/s 1234 | mfu 12.3%``.

    ``mfu`` is a fraction of peak and shows as a percentage; unknown numeric fields show with
    four significant digits. ``keys``, when given, are the only fields shown; ``startup/...``
    fields never are (the start-up line reports them).
    """
    if keys is not None:
        metrics = {k: v for k, v in metrics.items() if k in keys}
    # Start-up phases have their own line (mcore.core.training.profiling); files keep them.
    metrics = {k: v for k, v in metrics.items() if not k.startswith("startup/")}
    parts = [f"step {step}/{total_steps}"]
    for key, (label, fmt) in _FIELDS.items():
        if key in metrics:
            parts.append(f"{label} {fmt.format(metrics[key])}")
    if "mfu" in metrics:
        parts.append(f"mfu {100 * metrics['mfu']:.1f}%")
    for key, value in metrics.items():
        if key not in _FIELDS and key != "mfu":
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            parts.append(f"{key} {shown}")
    return " | ".join(parts)


def _plain(value: Any) -> Any:
    """A JSON-ready value: numbers stay numbers, 0-d tensors and numpy scalars become floats."""
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return float(value)


def _summary_writer(log_dir: str) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise McoreError(
            f"logger.tensorboard_dir is set ({log_dir!r}) but TensorBoard is not installed: "
            "pip install tensorboard, or unset logger.tensorboard_dir"
        ) from exc
    return SummaryWriter(log_dir=log_dir)


class MetricsLogger:
    """Progress bar, console lines, JSONL and TensorBoard for one training run.

    The progress bar (tqdm) shows only when ``progress_bar`` is set and ``stream`` is a
    terminal, so logs redirected to a file hold just the interval lines. ``stream`` defaults
    to ``sys.stdout`` as it is when the logger is made. The JSONL file is opened for
    appending, so a resumed run continues the same file.
    """

    def __init__(
        self,
        *,
        metrics_file: str | Path | None,
        tensorboard_dir: str | Path | None,
        log_interval: int,
        total_steps: int,
        progress_bar: bool,
        rank: int = 0,
        stream: IO[str] | None = None,
        start_step: int = 0,
        console_keys: tuple[str, ...] | None = None,
    ) -> None:
        if log_interval < 1:
            raise ValueError(f"log_interval must be >= 1, got {log_interval}")
        self.log_interval = log_interval
        self.total_steps = total_steps
        self.active = rank == 0
        self.console_keys = console_keys
        """The fields the console line shows (``None``: all); the JSONL and TensorBoard get
        every field."""
        self._stream = sys.stdout if stream is None else stream
        self._file: IO[str] | None = None
        self._writer: Any = None
        self._bar: Any = None
        if not self.active:
            return
        if tensorboard_dir is not None:
            self._writer = _summary_writer(str(tensorboard_dir))
        if metrics_file is not None:
            path = Path(metrics_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="utf-8")
        if progress_bar and _isatty(self._stream):
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps,
                initial=start_step,
                file=self._stream,
                unit="step",
                dynamic_ncols=True,
            )

    def should_log(self, step: int) -> bool:
        """Whether ``step`` gets a console line, a JSONL record and TensorBoard scalars."""
        return step % self.log_interval == 0 or step == self.total_steps

    def log(self, step: int, metrics: dict[str, Any], *, force: bool = False) -> None:
        """Record one finished step: advance the bar; on logging steps (or with ``force``, a
        step that evaluated) write everywhere."""
        if not self.active:
            return
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if "loss" in metrics:
                self._bar.set_postfix_str(f"loss {float(metrics['loss']):.4f}", refresh=False)
        if not (force or self.should_log(step)):
            return
        values = {key: _plain(value) for key, value in metrics.items()}
        line = format_line(step, self.total_steps, values, self.console_keys)
        if self._bar is not None:
            self._bar.write(line, file=self._stream)  # clears the bar, prints, redraws it
        else:
            print(line, file=self._stream, flush=True)
        if self._file is not None:
            self._file.write(json.dumps({"step": step, **values}) + "\n")
            self._file.flush()
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    tag = f"valid/{key[6:]}" if key.startswith("valid_") else f"train/{key}"
                    self._writer.add_scalar(tag, value, step)

    def check_finite(self, step: int, loss: Any) -> None:
        """``check_finite`` of this module, reachable from the logger the loop already holds."""
        check_finite(step, loss)

    def close(self) -> None:
        """Close the bar, the JSONL file and the TensorBoard writer; safe to call twice."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _isatty(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
