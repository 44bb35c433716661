"""Loading plugins: one at a time, broken ones reported by name, MCORE_LOAD_PLUGINS honoured."""

from __future__ import annotations

import types

import pytest

from mcore.core import PluginError, PluginManager, UnknownComponentError
from mcore.core import plugins as plugins_module

GOOD_ROUTER = """
from mcore.core import hookimpl

class Router:
    def forward(self, hidden, replay_indices=None): ...
    __call__ = forward

@hookimpl
def mcore_register(registry):
    registry.add("router", "good_router", Router)
"""

GOOD_MLP = """
from mcore.core import hookimpl

@hookimpl
def mcore_register(registry):
    registry.add("mlp", "good_mlp", dict)
"""


def test_entry_points_load_and_components_are_attributed(make_dist) -> None:
    make_dist(
        "good-router", {"good-router": "good_router_mod"}, {"good_router_mod.py": GOOD_ROUTER}
    )
    manager = PluginManager()
    manager.load_entry_points()
    info = manager.plugins["good-router"]
    assert (info.package, info.version, info.ok) == ("good-router", "1.0", True)
    assert manager.components_of("good-router") == {"router": ["good_router"]}
    assert manager.registries.get("router", "good_router").__name__ == "Router"


def test_a_plugin_that_fails_to_import_does_not_hide_the_others(make_dist) -> None:
    make_dist(
        "aaa-broken",
        {"aaa-broken": "aaa_broken_mod"},
        {"aaa_broken_mod.py": "import nope_not_here\n"},
    )
    make_dist("good-mlp", {"good-mlp": "good_mlp_mod"}, {"good_mlp_mod.py": GOOD_MLP})
    manager = PluginManager()
    manager.load_entry_points()
    [failed] = manager.failures
    assert failed.name == "aaa-broken" and failed.package == "aaa-broken"
    assert "nope_not_here" in failed.error and "aaa_broken_mod" in failed.error
    assert "Traceback" in failed.details
    assert manager.registries.get("mlp", "good_mlp") is dict


def test_a_plugin_whose_registration_raises_keeps_nothing(make_dist) -> None:
    source = """
from mcore.core import hookimpl

@hookimpl
def mcore_register(registry):
    registry.add("mlp", "half_done", dict)
    raise RuntimeError("boom")
"""
    make_dist("half", {"half": "half_mod"}, {"half_mod.py": source})
    manager = PluginManager()
    manager.load_entry_points()
    assert "registration failed: RuntimeError: boom" in manager.plugins["half"].error
    assert "half_done" not in manager.registries["mlp"]
    assert manager.pm.get_plugin("half") is None


def test_a_duplicate_from_a_second_plugin_is_reported_against_it(make_dist) -> None:
    clash = GOOD_ROUTER.replace("class Router", "class Other").replace("Router)", "Other)")
    make_dist("a-first", {"a-first": "a_first_mod"}, {"a_first_mod.py": GOOD_ROUTER})
    make_dist("b-second", {"b-second": "b_second_mod"}, {"b_second_mod.py": clash})
    manager = PluginManager()
    manager.load_entry_points()
    assert manager.plugins["a-first"].ok
    assert "already registered by plugin 'a-first'" in manager.plugins["b-second"].error
    assert manager.registries.get("router", "good_router").__name__ == "Router"


def test_an_override_replaces_another_plugins_component(make_dist) -> None:
    override = """
from mcore.core import hookimpl

class Better:
    def forward(self, hidden, replay_indices=None): ...
    __call__ = forward

@hookimpl
def mcore_register(registry):
    registry.add("router", "good_router", Better, override=True)
"""
    make_dist("a-first", {"a-first": "a_first_mod"}, {"a_first_mod.py": GOOD_ROUTER})
    make_dist("b-better", {"b-better": "b_better_mod"}, {"b_better_mod.py": override})
    manager = PluginManager()
    manager.load_entry_points()
    assert not manager.failures
    assert manager.registries.get("router", "good_router").__name__ == "Better"


def test_load_plugins_env_restricts_loading_to_named_plugins(make_dist, monkeypatch) -> None:
    make_dist(
        "good-router", {"good-router": "good_router_mod"}, {"good_router_mod.py": GOOD_ROUTER}
    )
    make_dist("good-mlp", {"good-mlp": "good_mlp_mod"}, {"good_mlp_mod.py": GOOD_MLP})
    monkeypatch.setenv("MCORE_LOAD_PLUGINS", "good-mlp, not-installed")
    manager = PluginManager()
    manager.load_entry_points()
    assert "good-mlp" in manager.plugins
    assert "good-router" not in manager.plugins
    assert "good-router" in manager.ignored
    assert manager.unknown_requested == ["not-installed"]
    # The core's own plugin always loads (it is installed in this environment).
    assert "mcore-core" in manager.plugins


def test_empty_load_plugins_env_loads_only_the_core(make_dist, monkeypatch) -> None:
    make_dist("good-mlp", {"good-mlp": "good_mlp_mod"}, {"good_mlp_mod.py": GOOD_MLP})
    monkeypatch.setenv("MCORE_LOAD_PLUGINS", "")
    manager = PluginManager()
    manager.load_entry_points()
    assert list(manager.plugins) == ["mcore-core"]


def test_hint_names_a_plugin_that_the_env_left_unloaded(make_dist, monkeypatch) -> None:
    fsdp = """
from mcore.core import hookimpl

@hookimpl
def mcore_register(registry):
    registry.add("data_parallel", "megatron_fsdp", dict)
"""
    make_dist("megatron-fsdp", {"megatron-fsdp": "fake_fsdp_mod"}, {"fake_fsdp_mod.py": fsdp})
    monkeypatch.setenv("MCORE_LOAD_PLUGINS", "mcore-core")
    manager = PluginManager()
    manager.load_entry_points()
    with pytest.raises(UnknownComponentError, match="MCORE_LOAD_PLUGINS leaves unloaded"):
        manager.registries.get("data_parallel", "megatron_fsdp")


def test_hint_names_a_provider_that_failed_to_load(make_dist) -> None:
    make_dist(
        "megatron-fsdp", {"megatron-fsdp": "broken_fsdp_mod"}, {"broken_fsdp_mod.py": "1/0\n"}
    )
    manager = PluginManager()
    manager.load_entry_points()
    with pytest.raises(UnknownComponentError, match="failed to load.*ZeroDivisionError"):
        manager.registries.get("data_parallel", "megatron_fsdp")


def test_run_time_registration_and_removal() -> None:
    plugin = types.SimpleNamespace()
    from mcore.core import hookimpl

    @hookimpl
    def mcore_register(registry):
        registry.add("tokenizer", "whitespace", str.split)

    plugin.mcore_register = mcore_register
    manager = PluginManager()
    info = manager.register(plugin, name="notebook")
    assert info.package is None
    assert manager.registries.get("tokenizer", "whitespace") is str.split
    with pytest.raises(PluginError, match="already registered"):
        manager.register(plugin, name="notebook")
    manager.unregister("notebook")
    assert "whitespace" not in manager.registries["tokenizer"]
    with pytest.raises(PluginError, match="no plugin named 'notebook'"):
        manager.unregister("notebook")


def test_run_time_registration_that_fails_raises_and_keeps_nothing() -> None:
    from mcore.core import hookimpl

    class Broken:
        @hookimpl
        def mcore_register(self, registry):
            registry.add("routers", "x", dict)

    manager = PluginManager()
    with pytest.raises(PluginError, match="unknown kind 'routers'"):
        manager.register(Broken(), name="broken")
    assert "broken" not in manager.plugins


def test_a_plugin_with_a_misspelt_hook_is_refused() -> None:
    from mcore.core import hookimpl

    class Typo:
        @hookimpl
        def mcore_regster(self, registry):
            pass

    manager = PluginManager()
    with pytest.raises(PluginError, match="mcore_regster"):
        manager.register(Typo(), name="typo")


def test_the_process_wide_manager_loads_entry_points_once(monkeypatch) -> None:
    calls = []
    original = PluginManager.load_entry_points

    def counting(self):
        calls.append(1)
        original(self)

    monkeypatch.setattr(PluginManager, "load_entry_points", counting)
    plugins_module.reset_plugin_manager()
    try:
        first = plugins_module.get_plugin_manager()
        assert plugins_module.get_plugin_manager() is first
        assert plugins_module.get_registry("config_section") is first.registries["config_section"]
        assert len(calls) == 1
    finally:
        plugins_module.reset_plugin_manager()
