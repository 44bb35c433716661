"""Fixtures that install our wheels into fresh virtual environments, the way a user would.

``make_venv("mcore-moe")`` gives a new venv with that requirement installed from wheels of this
checkout; tests then look at it from outside (``venv.mcore_json("plugins", "--json")``,
``venv.python("import ...")``, ``venv.distributions()``). Every venv is pinned the same way:

- Wheels of all workspace packages are built once per session (``uv build --package NAME``).
- Third-party versions come from ``uv.lock`` (``uv export`` into a constraints file), so torch and
  friends are hardlinked from uv's cache instead of downloaded, and match the dev environment.
- Our eight distribution names are *overridden* to point at those wheel files. Constraints or
  ``--find-links`` are not enough: PyPI has an unrelated ``megatron-fsdp`` with a higher version,
  and uv prefers it over a local 0.1.0 wheel. An override replaces every requirement on the name.

uv runs offline first (the cache has everything after ``uv sync``) and goes online only if that
fails, so the tests also pass without network.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_PLUGIN = ROOT / "examples" / "custom-router-plugin"
LORA_PLUGIN = ROOT / "examples" / "lora-plugin"
# Every workspace package, read from disk so a new package is covered without editing tests.
OUR_PACKAGES = tuple(
    sorted(
        tomllib.loads(p.read_text())["project"]["name"]
        for p in (ROOT / "packages").glob("*/pyproject.toml")
    )
)
# Environment variables that would let the dev environment leak into the venvs under test.
_LEAKY_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "MCORE_LOAD_PLUGINS")
TIMEOUT_S = 600


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LEAKY_ENV}
    env.update(extra)
    return env


def _check(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, (
        f"`{' '.join(map(str, result.args))}` exited with {result.returncode}\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )
    return result


@dataclass(frozen=True)
class Uv:
    """Runs ``uv``: offline from its cache first, online if that fails."""

    command: tuple[str, ...]

    def __call__(self, *args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
        cmd = [*self.command, *map(str, args)]
        env = _clean_env(UV_LINK_MODE=os.environ.get("UV_LINK_MODE", "hardlink"))
        attempts = [{}] if "UV_OFFLINE" in env else [{"UV_OFFLINE": "1"}, {}]
        for extra in attempts:
            result = subprocess.run(
                cmd, cwd=cwd, env={**env, **extra}, capture_output=True, text=True,
                timeout=TIMEOUT_S,
            )  # fmt: skip
            if result.returncode == 0:
                break
        return _check(result)


@dataclass(frozen=True)
class Venv:
    """A virtual environment under test, seen from outside."""

    path: Path

    def run(self, program: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        """Run ``bin/<program> args`` with ``env`` added to a clean environment; no check."""
        return subprocess.run(
            [str(self.path / "bin" / program), *args],
            env=_clean_env(**env),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )

    def python(self, code: str, **env: str) -> subprocess.CompletedProcess[str]:
        """Run Python ``code`` in the venv; no check, so a test can expect it to fail."""
        return self.run("python", "-c", code, **env)

    def mcore_json(self, *args: str, **env: str) -> Any:
        """Run the ``mcore`` command, check it succeeded and parse its JSON output."""
        return json.loads(_check(self.run("mcore", *args, **env)).stdout)

    @property
    def site_packages(self) -> Path:
        (site,) = self.path.glob("lib/python*/site-packages")
        return site

    def distributions(self) -> dict[str, md.Distribution]:
        """Every installed distribution, by canonical name."""
        dists = md.distributions(path=[str(self.site_packages)])
        return {canonicalize_name(d.metadata["Name"]): d for d in dists}

    def source_of(self, name: str) -> str:
        """The URL a distribution was installed from (PEP 610 ``direct_url.json``), or ``""``."""
        direct_url = self.distributions()[name].read_text("direct_url.json")
        return json.loads(direct_url)["url"] if direct_url else ""

    def requirement_closure(self, name: str) -> set[str]:
        """``name`` and everything it requires here, recursively, with markers and extras."""
        dists = self.distributions()
        seen: set[tuple[str, str]] = set()  # (distribution, extra or "") pairs walked
        todo = [(canonicalize_name(name), "")]
        while todo:
            current, extra = todo.pop()
            if (current, extra) in seen:
                continue
            seen.add((current, extra))
            for line in dists[current].requires or []:
                req = Requirement(line)
                if req.marker is None or req.marker.evaluate({"extra": extra}):
                    dep = canonicalize_name(req.name)
                    todo += [(dep, "")] + [(dep, e) for e in req.extras]
        return {dist for dist, _ in seen}


def _find_uv() -> tuple[str, ...] | None:
    # `uv run` exports UV, the path of the uv binary that started the tests.
    found = os.environ.get("UV") or shutil.which("uv")
    if found:
        return (found,)
    if importlib.util.find_spec("uv") is not None:  # the `uv` package from PyPI
        return (sys.executable, "-m", "uv")
    return None


@pytest.fixture(scope="session")
def uv() -> Uv:
    command = _find_uv()
    if command is None:
        pytest.skip("uv is not installed: these tests build wheels and venvs with uv")
    return Uv(command)


@pytest.fixture(scope="session")
def wheels(uv: Uv, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Wheels of our eight packages built from this checkout, by distribution name."""
    out = tmp_path_factory.mktemp("wheels")
    for name in OUR_PACKAGES:  # one by one: each package must build on its own
        uv("build", "--package", name, "--wheel", "--out-dir", out)
    built = {canonicalize_name(w.name.split("-")[0]): w for w in out.glob("*.whl")}
    missing = set(OUR_PACKAGES) - set(built)
    assert not missing, f"uv build made no wheel for {sorted(missing)}"
    return {name: built[name] for name in OUR_PACKAGES}


@pytest.fixture(scope="session")
def example_plugin_wheel(uv: Uv, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of examples/custom-router-plugin, built in its own folder as its author would."""
    out = tmp_path_factory.mktemp("example-wheel")
    uv("build", "--wheel", "--out-dir", out, cwd=EXAMPLE_PLUGIN)
    (wheel,) = out.glob("*.whl")
    return wheel


@pytest.fixture(scope="session")
def lora_plugin_wheel(uv: Uv, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of examples/lora-plugin, built in its own folder as its author would."""
    out = tmp_path_factory.mktemp("lora-wheel")
    uv("build", "--wheel", "--out-dir", out, cwd=LORA_PLUGIN)
    (wheel,) = out.glob("*.whl")
    return wheel


@pytest.fixture(scope="session")
def pins(uv: Uv, wheels: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The ``uv pip install`` options that pin third parties to the lock and us to our wheels."""
    folder = tmp_path_factory.mktemp("pins")
    constraints = folder / "constraints.txt"
    uv("export", "--frozen", "--no-hashes", "--no-emit-workspace", "--all-packages",
       "--quiet", "--output-file", constraints)  # fmt: skip
    overrides = folder / "overrides.txt"
    overrides.write_text("".join(f"{name} @ {w.as_uri()}\n" for name, w in wheels.items()))
    return ["--constraints", str(constraints), "--override", str(overrides)]


@pytest.fixture(scope="session")
def make_venv(
    uv: Uv, pins: list[str], tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., Venv]:
    """``make_venv(*requirements)``: a fresh venv with just those installed (names or wheels)."""

    def make(*requirements: str | Path) -> Venv:
        label = "+".join(r.name.split("-")[0] if isinstance(r, Path) else r for r in requirements)
        venv = Venv(tmp_path_factory.mktemp(f"venv-{label}") / "venv")
        uv("venv", "--quiet", "--python", sys.executable, venv.path)
        uv("pip", "install", "--python", venv.path / "bin" / "python", *pins, *requirements)
        return venv

    return make
