"""tools/api_check.py: each kind of break is caught, compatible changes and marked objects pass,
baselines come from a committed snapshot or from the last release tag, and this repository
passes against its own baseline."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "api_check.py"
spec = importlib.util.spec_from_file_location("api_check", TOOL)
api_check = importlib.util.module_from_spec(spec)
sys.modules["api_check"] = api_check
spec.loader.exec_module(api_check)

OLD = """
from mcore.core.api import deprecated, experimental_api, internal_api

class Base: ...

class Router(Base):
    def route(self, scores, k: int = 2) -> list: ...

def removed(x): ...
def params_removed(a, b): ...
def params_moved(a, b): ...
def made_required(a, b=1): ...
def added_required(a): ...
def to_keyword_only(a, b): ...
def returns() -> int: ...
def becomes_class(): ...
limit: int = 3

def compatible(a, b=1): ...
DEFAULT = 1

@internal_api
def internal_helper(a): ...

@experimental_api
class Trial:
    def go(self, a): ...

@deprecated(version="0.1", removal_version="0.3", alternative="compatible")
def old_name(a): ...

def _private(a): ...
"""

NEW = '''
from mcore.core.api import deprecated, experimental_api, internal_api

class Base: ...

class Router:
    def route(self, k: int = 2, scores=None) -> list: ...

def params_removed(a): ...
def params_moved(b, a): ...
def made_required(a, b): ...
def added_required(a, b): ...
def to_keyword_only(a, *, b): ...
def returns() -> str: ...
class becomes_class: ...
limit: str = "3"

def compatible(a, b=2, c=None, *, d=0):
    """New docs."""
def brand_new(x): ...
DEFAULT = 2

@internal_api
def internal_helper(a, b, c): ...

@experimental_api
class Trial:
    def go(self, b, a): ...

def _private(b): ...
'''

EXPECTED = {
    ("fixture.mod.removed", "Public object was removed"),
    ("fixture.mod.params_removed", "Parameter was removed"),
    ("fixture.mod.params_moved", "Positional parameter was moved"),
    ("fixture.mod.made_required", "Parameter is now required"),
    ("fixture.mod.added_required", "Parameter was added as required"),
    ("fixture.mod.to_keyword_only", "Parameter kind was changed"),
    ("fixture.mod.returns", "Return types are incompatible"),
    ("fixture.mod.becomes_class", "Public object points to a different kind of object"),
    ("fixture.mod.limit", "Attribute types are incompatible"),
    ("fixture.mod.Router", "Base class was removed"),
    ("fixture.mod.Router.route", "Positional parameter was moved"),
    ("fixture.mod.old_name", "object removed before its removal_version"),
}


def _package(root: Path, body: str) -> Path:
    pkg = root / "fixture"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(textwrap.dedent(body))
    (pkg / "tests").mkdir()
    (pkg / "tests" / "__init__.py").write_text("")
    (pkg / "tests" / "test_mod.py").write_text("def test_x(a): ...\n")
    return root


def _breaks(tmp_path: Path, old: str, new: str, version: str, via_snapshot: bool = True):
    old_obj = api_check.load_current("fixture", _package(tmp_path / "old", old))
    if via_snapshot:  # the committed-baseline path: griffe's JSON, reloaded
        old_obj = api_check.load_snapshot(api_check.snapshot(old_obj), "fixture")
    new_obj = api_check.load_current("fixture", _package(tmp_path / "new", new))
    return list(api_check.find_breaks(old_obj, new_obj, version))


@pytest.mark.parametrize("via_snapshot", [True, False], ids=["snapshot", "source"])
def test_every_kind_of_break_is_reported_with_location_and_rule(tmp_path, via_snapshot):
    breaks = _breaks(tmp_path, OLD, NEW, "0.2", via_snapshot)
    assert {(b.path, b.rule) for b in breaks} == EXPECTED
    by_path = {b.path: b for b in breaks}
    assert by_path["fixture.mod.params_removed"].detail == "parameter b"
    assert by_path["fixture.mod.made_required"].detail == "parameter b, was optional, now required"
    assert (
        by_path["fixture.mod.params_moved"].detail == "parameter a, now at position 2 of ['b', 'a']"
    )
    assert by_path["fixture.mod.to_keyword_only"].detail == (
        "parameter b, was positional or keyword, now keyword-only"
    )
    assert by_path["fixture.mod.returns"].detail == "was int, now str"
    assert by_path["fixture.mod.becomes_class"].detail == "was a function, now a class"
    assert by_path["fixture.mod.Router"].detail == "no longer derives from Base"
    assert by_path["fixture.mod.removed"].detail == "gone from the public API"
    assert "before its removal_version 0.3" in by_path["fixture.mod.old_name"].detail
    # Locations point at the old object's line, so a reviewer finds what was promised.
    location = by_path["fixture.mod.returns"].location
    assert location.endswith("fixture/mod.py:14"), location


def test_a_deprecated_object_may_go_at_its_removal_version(tmp_path):
    breaks = _breaks(tmp_path, OLD, NEW, "0.3")
    assert {b.path for b in breaks} == {p for p, _ in EXPECTED} - {"fixture.mod.old_name"}


def test_compatible_changes_pass(tmp_path):
    old = "def f(a, b=1):\n    ...\nclass C:\n    x: int = 1\n    def m(self, a): ...\n"
    new = (
        "def f(a, b=5, c=None, *args, d=1, **kw):\n    'Docs.'\n"
        "def g(): ...\n"
        "class C:\n    x: int = 2\n    y: str = ''\n    def m(self, a, b=0): ...\n"
        "    def n(self): ...\n"
    )
    assert _breaks(tmp_path, old, new, "0.2") == []


def _repo(tmp_path: Path, body: str) -> Path:
    """A repository laid out like this one, holding one package, mcore-core."""
    root = tmp_path / "repo"
    src = root / "packages" / "mcore-core" / "src" / "mcore" / "core"
    src.mkdir(parents=True)
    (src / "__init__.py").write_text("")
    (src / "mod.py").write_text(textwrap.dedent(body))
    (root / "packages" / "mcore-core" / "pyproject.toml").write_text(
        '[project]\nname = "mcore-core"\nversion = "0.2.0"\n'
    )
    return root


def _cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TOOL), "--root", str(root), "-p", "mcore-core", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _git(root: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True,
        capture_output=True,
    )  # fmt: skip


def test_the_command_exits_1_on_a_break_against_the_committed_baseline(tmp_path):
    root = _repo(tmp_path, "def load(path, strict=False): ...\n")
    assert _cli(root, "--update-baseline").returncode == 0
    assert (root / "tools" / "api-baseline" / "mcore-core.json").exists()
    assert _cli(root).returncode == 0
    (root / "packages/mcore-core/src/mcore/core/mod.py").write_text("def load(path, strict): ...\n")
    result = _cli(root)
    assert result.returncode == 1
    assert "mcore.core.mod.load: Parameter is now required" in result.stdout
    assert "mod.py:1" in result.stdout and "@deprecated" in result.stderr


def test_the_last_release_tag_is_the_baseline_when_there_is_one(tmp_path):
    root = _repo(tmp_path, "def load(path): ...\ndef save(path): ...\n")
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "v0.1.0")
    _git(root, "tag", "v0.1.0")
    mod = root / "packages/mcore-core/src/mcore/core/mod.py"
    mod.write_text("def load(path): ...\n")
    _git(root, "commit", "-qam", "drop save")
    # A megatron-fsdp release tag is not a release of the mcore family.
    _git(root, "tag", "megatron-fsdp-v9.0.0")
    result = _cli(root)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "against git v0.1.0" in result.stdout
    assert "mcore.core.mod.save: Public object was removed" in result.stdout
    # --against picks another ref; against HEAD itself nothing changed.
    assert _cli(root, "--against", "HEAD").returncode == 0


def test_this_repository_passes_against_its_baseline():
    result = subprocess.run(
        [sys.executable, str(TOOL)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(": ok") == len(api_check.PACKAGES)
