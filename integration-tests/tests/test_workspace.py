"""The monorepo's rules hold: packages, versions, namespace, lint, import contracts, lock."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
FAMILY = [
    "mcore-core",
    "mcore-parallel",
    "mcore-models",
    "mcore-moe",
    "mcore-ssm",
    "mcore-ckpt",
    "mcore-inference",
    "megatron-rl",
    "mcore-distill",
]
PACKAGES = [*FAMILY, "megatron-fsdp"]


def pyproject(name: str) -> dict:
    return tomllib.loads((ROOT / "packages" / name / "pyproject.toml").read_text())


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def test_mcore_plugins_lists_all_ten_packages() -> None:
    result = run(str(BIN / "mcore"), "plugins", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert sorted(p["package"] for p in report["plugins"]) == sorted(PACKAGES)
    assert report["failed"] == []
    sections = {
        name for p in report["plugins"] for name in p["components"].get("config_section", [])
    }
    assert sections >= {"model", "parallel", "train", "optimizer", "data", "checkpoint",
                        "logger", "straggler", "moe", "ssm", "fsdp", "inference",
                        "rl", "kd"}  # fmt: skip


def test_loading_every_plugin_does_not_import_torch() -> None:
    # `mcore plugins` and `mcore --help` stay fast: heavy components are registered lazily.
    code = "import sys; from mcore.core import get_plugin_manager; get_plugin_manager(); "
    code += "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = run(sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["train", "--help"], ["plan", "--help"], ["plugins"],
     ["rl", "--rl.group-size", "1"], ["ckpt", "inspect", "/no/such/checkpoint"]],
    ids=["help", "train-help", "plan-help", "plugins", "bad-config", "missing-checkpoint"],
)  # fmt: skip
def test_the_cli_answers_help_listings_and_bad_input_without_importing_torch(argv) -> None:
    # Importing torch costs seconds; `mcore` parses every command's arguments up front, so
    # no command may import it to build its parser, and refusals come before it too.
    code = (
        "import contextlib, io, sys\nfrom mcore.core.cli import main\nout = io.StringIO()\n"
        "with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):\n"
        "    try:\n        code = main(sys.argv[1:])\n"
        "    except SystemExit as exc:\n        code = exc.code\n"
        "print(code, 'torch' in sys.modules)"
    )
    result = run(sys.executable, "-c", code, *argv)
    assert result.returncode == 0, result.stderr
    exit_code, imported = result.stdout.split()
    assert exit_code in ("0", "2", "None"), result.stdout
    assert imported == "False", argv


def test_plugins_output_into_a_closed_pipe_is_quiet() -> None:
    # stdout is a pipe whose reader is already gone (as with `mcore plugins | head -1` once head
    # has exited), so the first write fails with EPIPE every time.
    code = (
        "import os, sys; r, w = os.pipe(); os.close(r); os.dup2(w, 1); "
        "from mcore.core.cli import main; sys.exit(main(['plugins']))"
    )
    result = run(sys.executable, "-c", code)
    assert result.returncode == 141, result.stderr
    assert "Traceback" not in result.stderr


def test_full_config_shows_every_section() -> None:
    result = run(str(BIN / "mcore"), "config", "show", "--json", "--moe.num-experts", "8")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["moe"]["num_experts"] == 8


@pytest.mark.parametrize("name", PACKAGES)
def test_package_layout(name: str) -> None:
    folder = ROOT / "packages" / name
    meta = pyproject(name)
    assert meta["build-system"]["build-backend"] == "hatchling.build"
    assert (folder / "README.md").read_text().startswith(f"# {name}")
    assert list((folder / "tests").glob("test_*.py")), f"{name} has no tests"
    assert list(meta["project"]["entry-points"]["mcore"]) == [name]
    # PEP 420: no wheel may own the mcore namespace.
    assert not (folder / "src" / "mcore" / "__init__.py").exists()


def test_the_family_releases_together_and_pins_itself_exactly() -> None:
    versions = {name: pyproject(name)["project"]["version"] for name in FAMILY}
    assert len(set(versions.values())) == 1, versions
    version = versions["mcore-core"]
    for name in FAMILY:
        for dep in pyproject(name)["project"]["dependencies"]:
            dep_name = dep.split("==")[0].split(">=")[0].strip()
            if dep_name in PACKAGES:
                assert dep == f"{dep_name}=={version}", f"{name} must pin {dep_name}=={version}"


def test_megatron_fsdp_depends_on_torch_alone() -> None:
    deps = pyproject("megatron-fsdp")["project"]["dependencies"]
    # numpy only because torch.distributed.checkpoint needs it at run time without declaring it
    assert [d.split(">")[0].split("=")[0] for d in deps] == ["numpy", "torch"]


def test_ruff_lint_and_format_pass() -> None:
    for cmd in (["check", "."], ["format", "--check", "."]):
        result = run(str(BIN / "ruff"), *cmd)
        assert result.returncode == 0, result.stdout + result.stderr


def test_import_contracts_hold() -> None:
    result = run(str(BIN / "lint-imports"), "--no-cache")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_lock_is_up_to_date() -> None:
    uv = shutil.which("uv") or str(BIN / "uv")
    result = run(uv, "lock", "--check", "--offline")
    assert result.returncode == 0, result.stderr


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()


def test_readme_dependency_column_says_what_each_pyproject_declares() -> None:
    """The root README's package table names every dependency, and every optional one with its
    extra (``[te]``), and nothing the package does not declare."""
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        match = re.match(r"\| \[([\w-]+)\]\(packages/[\w-]+\) \| `[\w.]+` \| (.+?) \| .+ \|$", line)
        if match:
            rows[match.group(1)] = match.group(2)
    assert sorted(rows) == sorted(PACKAGES)
    declared = {}
    for name in PACKAGES:
        project = pyproject(name)["project"]
        required = {_requirement_name(r) for r in project["dependencies"]}
        optional = {
            _requirement_name(r): extra
            for extra, reqs in project.get("optional-dependencies", {}).items()
            for r in reqs
        }
        declared[name] = (required, optional)
    universe = {n for req, opt in declared.values() for n in (*req, *opt)}
    for name, (required, optional) in declared.items():
        cell = rows[name]
        named = {w.lower() for w in re.findall(r"[\w-]+", cell)} & universe
        assert named == required | optional.keys(), (name, cell)
        for dep, extra in optional.items():
            assert f"{dep} with `[{extra}]`" in cell, (name, dep, cell)
