"""``mcore plot``: a metrics file in, a PNG out, and clear words when the file is wrong."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mcore.core import cli
from mcore.core.plugins import reset_plugin_manager
from mcore.core.training.plot import plot_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def core_only(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MCORE_LOAD_PLUGINS", "")
    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture
def metrics_file(tmp_path: Path) -> Path:
    path = tmp_path / "run" / "metrics.jsonl"
    path.parent.mkdir()
    records = [
        {"step": s, "loss": 5.0 / s, "grad_norm": 1.0, "lr": 1e-4 * s, "tokens_per_s": 900.0}
        for s in range(10, 60, 10)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def mcore(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plot_writes_a_png_beside_the_metrics(capsys, metrics_file: Path) -> None:
    code, out, err = mcore(capsys, "plot", str(metrics_file))
    assert code == 0, err
    png = metrics_file.with_suffix(".png")
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    assert out.strip() == f"wrote {png} (loss, grad_norm, lr, tokens_per_s)"


def test_plot_to_a_chosen_file_and_keys(capsys, metrics_file: Path, tmp_path: Path) -> None:
    png = tmp_path / "plots" / "loss.png"
    code, out, err = mcore(capsys, "plot", str(metrics_file), "-o", str(png), "--keys", "loss")
    assert code == 0, err
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    assert out.strip().endswith("(loss)")


def test_only_the_metrics_present_are_drawn(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": 1.5, "lr": null}\n')
    assert plot_metrics(path, tmp_path / "out.png") == ["loss", "lr"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "metrics file {path} does not exist"),
        ("", "metrics file {path} is empty"),
        ('{"step": 1, "loss": 2.0}\n{"step": 2, "lo', "{path}:2: not valid JSON"),
        ('{"step": 1, "loss": 2.0}\n[1, 2]\n', "{path}:2: expected a JSON object with an integer"),
        (
            '{"step": 1, "accuracy": 0.5}\n',
            "has none of loss, valid_loss, grad_norm, lr, tokens_per_s",
        ),
    ],
    ids=["missing", "empty", "truncated-line", "not-an-object", "no-known-metric"],
)
def test_a_bad_file_is_named_with_its_line(
    capsys, tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "metrics.jsonl"
    if content is not None:
        path.write_text(content)
    code, _, err = mcore(capsys, "plot", str(path))
    assert code == 2
    assert err.startswith("mcore plot: ")
    assert message.format(path=path) in err
    assert "Traceback" not in err
    assert not path.with_suffix(".png").exists()


def test_without_matplotlib_it_says_what_to_install(
    capsys, metrics_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if not installed
    code, _, err = mcore(capsys, "plot", str(metrics_file))
    assert code == 2
    assert "pip install 'mcore-core[plot]'" in err
