"""``mcore plot METRICS.jsonl``: draw the training curves of a metrics file into a PNG.

matplotlib is imported only when a plot is drawn (it is the ``plot`` extra of mcore-core), so
registering the command costs nothing.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mcore.core.errors import McoreError
from mcore.core.registry import CliCommand

DEFAULT_KEYS = ("loss", "valid_loss", "grad_norm", "lr", "tokens_per_s")


def read_metrics(jsonl_path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics file, one JSON object with a ``step`` per non-blank line."""
    path = Path(jsonl_path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise McoreError(f"metrics file {path} does not exist") from None
    except OSError as exc:
        raise McoreError(f"cannot read metrics file {path}: {exc.strerror}") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise McoreError(
                f"{path}:{number}: not valid JSON ({exc.msg}): {line[:80]!r}"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise McoreError(
                f"{path}:{number}: expected a JSON object with an integer 'step', got {line[:80]!r}"
            )
        records.append(record)
    if not records:
        raise McoreError(f"metrics file {path} is empty: no step has been logged to it yet")
    return records


def plot_metrics(
    jsonl_path: str | Path,
    out_png: str | Path,
    *,
    keys: Sequence[str] = DEFAULT_KEYS,
) -> list[str]:
    """Draw one subplot per key of ``keys`` found in the file, against step; returns those keys."""
    records = read_metrics(jsonl_path)
    present = [key for key in keys if any(key in record for record in records)]
    if not present:
        found = sorted({key for record in records for key in record} - {"step"})
        raise McoreError(
            f"metrics file {jsonl_path} has none of {', '.join(keys)}; "
            f"it has: {', '.join(found) or 'only steps'}"
        )
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise McoreError("mcore plot needs matplotlib: pip install 'mcore-core[plot]'") from None

    # Figure without pyplot: no GUI backend is chosen and no global state is touched.
    fig = Figure(figsize=(7, 2.2 * len(present)), layout="constrained")
    axes = fig.subplots(len(present), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, present, strict=True):
        points = [(r["step"], _number(r[key])) for r in records if key in r]
        ax.plot([s for s, _ in points], [v for _, v in points], linewidth=1.2)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.suptitle(Path(jsonl_path).name)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    return present


def _number(value: Any) -> float:
    """A value to plot; null or text (a skipped step) becomes a gap."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("metrics", metavar="METRICS.jsonl", help="metrics file of a run")
    parser.add_argument(
        "-o", "--output", metavar="OUT.png", help="where to write (default: METRICS.png)"
    )
    parser.add_argument(
        "--keys",
        default=",".join(DEFAULT_KEYS),
        help=f"comma-separated metrics to draw (default: {','.join(DEFAULT_KEYS)})",
    )


def _run(args: argparse.Namespace) -> int:
    out = Path(args.output) if args.output else Path(args.metrics).with_suffix(".png")
    keys = [key.strip() for key in args.keys.split(",") if key.strip()]
    drawn = plot_metrics(args.metrics, out, keys=keys)
    print(f"wrote {out} ({', '.join(drawn)})")
    return 0


PLOT = CliCommand(
    help="draw the curves of a metrics.jsonl (loss, grad norm, lr, tokens/s) into a PNG",
    configure=_configure,
    run=_run,
)
