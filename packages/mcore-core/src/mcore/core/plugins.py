"""Finding, loading and registering plugins.

Entry points of the ``mcore`` group are loaded one at a time, so a plugin that fails to import
or register is reported by name while every other plugin still loads (pluggy's own
``load_setuptools_entrypoints`` stops at the first failure). ``MCORE_LOAD_PLUGINS=a,b`` limits
loading to the named plugins; the core's own plugin always loads.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import threading
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from mcore.core import hookspecs
from mcore.core.errors import PluginError
from mcore.core.registry import KINDS, PluginRegistrar, Registries, provider_of

ENTRY_POINT_GROUP = "mcore"
LOAD_PLUGINS_ENV = "MCORE_LOAD_PLUGINS"
CORE_PLUGIN = "mcore-core"


@dataclass
class PluginInfo:
    """What is known about one plugin: where it came from and whether it loaded."""

    name: str
    package: str | None = None
    version: str | None = None
    module: str | None = None
    error: str | None = None
    details: str | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None


def _distribution_name(dist: md.Distribution | None) -> str | None:
    return dist.metadata["Name"] if dist is not None else None


def _restriction() -> set[str] | None:
    raw = os.environ.get(LOAD_PLUGINS_ENV)
    if raw is None:
        return None
    return {n.strip() for n in raw.split(",") if n.strip()}


class PluginManager:
    """Loads plugins once and holds the registries they fill and the hooks they implement."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.registries = Registries(missing_hint=self.missing_hint)
        self.plugins: dict[str, PluginInfo] = {}
        self.ignored: list[str] = []
        self.unknown_requested: list[str] = []

    @property
    def hook(self) -> Any:
        """Call hooks through this, e.g. ``manager.hook.mcore_on_train_start(trainer=t)``."""
        return self.pm.hook

    @property
    def failures(self) -> list[PluginInfo]:
        """Plugins that failed to import or register."""
        return [p for p in self.plugins.values() if not p.ok]

    def load_entry_points(self, only: Iterable[str] | None = None) -> PluginManager:
        """Load every installed ``mcore`` entry point, or only those named by ``only`` (else by
        ``MCORE_LOAD_PLUGINS``); the core's own plugin always loads. Returns the manager."""
        wanted = set(only) if only is not None else _restriction()
        seen: set[str] = set()
        eps = sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
        for ep in eps:
            if ep.name in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add(ep.name)
            package = _distribution_name(ep.dist)
            if wanted is not None and ep.name != CORE_PLUGIN and not ({ep.name, package} & wanted):
                self.ignored.append(ep.name)
                continue
            info = PluginInfo(
                name=ep.name,
                package=package,
                version=ep.dist.version if ep.dist is not None else None,
                module=ep.value,
            )
            self.plugins[ep.name] = info
            try:
                module = ep.load()
            except Exception as exc:
                self._fail(info, f"import of {ep.value!r} failed: {type(exc).__name__}: {exc}")
                continue
            self._register(info, module)
        if wanted is not None:
            known = {p.name for p in self.plugins.values()} | {
                p.package for p in self.plugins.values() if p.package
            }
            self.unknown_requested = sorted(wanted - known)
        return self

    def register(self, plugin: object, name: str | None = None) -> PluginInfo:
        """Register a plugin object (module, class instance) at run time.

        Its ``mcore_register`` hook runs at once; raises :class:`PluginError` if it fails, and
        then nothing of the plugin is kept.
        """
        module: str | None = getattr(plugin, "__name__", None)
        name = name or module or type(plugin).__name__
        if name in self.plugins:
            raise PluginError(
                f"a plugin named {name!r} is already registered; unregister it first "
                f"or choose another name"
            )
        info = PluginInfo(name=name, module=module)
        self.plugins[name] = info
        self._register(info, plugin)
        if not info.ok:
            del self.plugins[name]
            raise PluginError(f"plugin {name!r}: {info.error}")
        return info

    def unregister(self, name: str) -> None:
        """Remove a plugin and every component it registered."""
        if name not in self.plugins:
            raise PluginError(f"no plugin named {name!r}; registered: {', '.join(self.plugins)}")
        del self.plugins[name]
        self.registries.remove_plugin(name)
        if self.pm.get_plugin(name) is not None:
            self.pm.unregister(name=name)

    def components_of(self, name: str) -> dict[str, list[str]]:
        """``{kind: [names]}`` that plugin ``name`` contributed."""
        return self.registries.components_of(name)

    def hooks_of(self, name: str) -> list[str]:
        """The hooks plugin ``name`` implements, other than ``mcore_register``."""
        plugin = self.pm.get_plugin(name)
        if plugin is None:
            return []
        callers = self.pm.get_hookcallers(plugin) or []
        return sorted(c.name for c in callers if c.name != "mcore_register")

    def _register(self, info: PluginInfo, plugin: object) -> None:
        try:
            self.pm.register(plugin, name=info.name)
        except Exception as exc:
            self._fail(info, f"not a valid mcore plugin: {exc}")
            return
        try:
            # A hook implementation whose name matches no spec is a typo: refuse it now rather
            # than have it silently never called. Earlier plugins were checked already.
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(plugin)
            self._fail(info, f"not a valid mcore plugin: {exc}")
            return
        impls = [i for i in self.pm.hook.mcore_register.get_hookimpls() if i.plugin is plugin]
        registrar = PluginRegistrar(info.name)
        try:
            for impl in impls:
                impl.function(registry=registrar)
            self.registries.add_all(registrar.components)
        except Exception as exc:
            self.pm.unregister(plugin)
            self._fail(info, f"registration failed: {type(exc).__name__}: {exc}")

    def _fail(self, info: PluginInfo, error: str) -> None:
        info.error = error
        info.details = traceback.format_exc()

    def missing_hint(self, kind: str, name: str) -> str | None:
        """Which package to install (or fix) so that ``name`` exists in registry ``kind``."""
        package = provider_of(kind, name)
        home = KINDS[kind].provider
        if package is None and not self._installed(home):
            return f"The usual {kind} components come with {home}: pip install {home}"
        if package is None:
            return None
        dist = package.split("[")[0]
        broken = [p for p in self.failures if p.package == dist]
        if broken:
            return f"Plugin {broken[0].name!r} provides it but failed to load: {broken[0].error}"
        if dist in self.ignored:
            return f"It is provided by {dist}, which {LOAD_PLUGINS_ENV} leaves unloaded."
        if not self._installed(dist) or package != dist:
            return f"It is provided by {package}: pip install {package}"
        return None

    def _installed(self, dist: str) -> bool:
        return dist in self.ignored or any(p.package == dist for p in self.plugins.values())


_manager: PluginManager | None = None
_lock = threading.Lock()


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager; entry points are loaded on first use, once."""
    global _manager
    with _lock:
        if _manager is None:
            manager = PluginManager()
            manager.load_entry_points()
            _manager = manager
        return _manager


def reset_plugin_manager() -> None:
    """Forget the loaded plugins so the next :func:`get_plugin_manager` loads them afresh."""
    global _manager
    with _lock:
        _manager = None


def register_plugin(plugin: object, name: str | None = None) -> PluginInfo:
    """Register a plugin object at run time with the process-wide manager."""
    return get_plugin_manager().register(plugin, name)


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered at run time (or loaded) and all its components."""
    get_plugin_manager().unregister(name)


def get_registry(kind: str) -> Any:
    """The registry of ``kind`` (``"router"``, ``"model"``, ...) after plugins are loaded."""
    return get_plugin_manager().registries[kind]
