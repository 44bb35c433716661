"""Fixtures: real installed distributions made on disk, so entry points load as in production."""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mcore.core import PluginManager
from mcore.core import plugin as core_plugin


@pytest.fixture
def make_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Path]]:
    """``make_dist(name, {ep_name: "module"}, {"module.py": source})`` installs a distribution.

    It writes a ``.dist-info`` with METADATA and entry_points.txt plus the modules into a folder
    on ``sys.path``, which is where ``importlib.metadata`` finds installed packages.
    """
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    made_modules: list[str] = []

    def make(
        name: str,
        entry_points: dict[str, str],
        modules: dict[str, str],
        version: str = "1.0",
    ) -> Path:
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        eps = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
        (info / "entry_points.txt").write_text(f"[mcore]\n{eps}\n")
        for filename, source in modules.items():
            (site / filename).write_text(textwrap.dedent(source))
            made_modules.append(filename.removesuffix(".py"))
        importlib.invalidate_caches()
        return info

    yield make
    for module in made_modules:
        sys.modules.pop(module, None)


@pytest.fixture
def core_manager() -> PluginManager:
    """A manager holding only the core's own plugin, independent of what is installed."""
    manager = PluginManager()
    manager.register(core_plugin, name="mcore-core")
    return manager
