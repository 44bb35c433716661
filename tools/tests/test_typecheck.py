"""The type checker over every package's sources: basedpyright, as the root pyproject.toml's
``[tool.basedpyright]`` configures it, reports no errors (``uv run basedpyright`` shows the
same report)."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECKER = Path(sys.executable).parent / "basedpyright"


def _configured() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["basedpyright"]


def test_every_package_is_type_checked() -> None:
    include = _configured()["include"]
    assert "packages/*/src/**" in include, include  # a new package is included by itself
    assert "tools/api_check.py" in include, include


def test_sources_have_no_type_errors() -> None:
    if not CHECKER.exists():
        pytest.fail(f"{CHECKER} is missing: basedpyright is in the root dev group (uv sync)")
    # The interpreter running the tests, so the checker resolves the same installed packages.
    command = [str(CHECKER), "--outputjson", "--pythonpath", sys.executable]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"basedpyright gave no report (exit {result.returncode}):\n{result.stderr}")
    summary = report["summary"]
    sources = [*ROOT.glob("packages/*/src/**/*.py"), ROOT / "tools" / "api_check.py"]
    assert summary["filesAnalyzed"] == len(sources), summary
    errors = [d for d in report["generalDiagnostics"] if d["severity"] == "error"]
    listing = "\n".join(
        f"{Path(d['file']).relative_to(ROOT)}:{d['range']['start']['line'] + 1}: "
        f"{d['message']} ({d.get('rule', 'error')})"
        for d in errors
    )
    assert not errors, f"{len(errors)} type error(s):\n{listing}"
