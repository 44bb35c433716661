"""Registries: names resolve, unknown names explain themselves, duplicates need an override."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import pytest

from mcore.core import (
    KINDS,
    DuplicateComponentError,
    McoreError,
    PluginManager,
    UnknownComponentError,
)
from mcore.core.registry import Component, Kind, Lazy, PluginRegistrar, Registries, Registry


class TopK:
    """A stand-in router: the members of the router kind's protocol, nothing behind them."""

    def forward(self, hidden, replay_indices=None): ...

    __call__ = forward


class MyTopK(TopK):
    pass


def test_every_kind_the_design_names_has_a_registry() -> None:
    expected = {
        "router", "token_dispatcher", "flex_backend", "mlp", "norm", "attention", "mixer", "layer",
        "model", "attention_backend", "linear_backend", "data_parallel", "optimizer",
        "checkpoint_format", "hf_architecture", "dataset", "tokenizer", "rl_env", "rl_agent",
        "cli_command", "config_section",
    }  # fmt: skip
    assert set(KINDS) == expected
    registries = Registries()
    for kind in expected:
        assert registries.names(kind) == []


def test_added_component_resolves_by_name() -> None:
    registries = Registries()
    registries.add_all([Component("router", "topk", TopK, "moe")])
    assert registries.get("router", "topk") is TopK
    assert "topk" in registries["router"]
    assert registries.components_of("moe") == {"router": ["topk"]}


def test_unknown_name_lists_known_ones_and_suggests_the_closest() -> None:
    registries = Registries()
    registries.add_all(
        [Component("router", "topk", TopK, "moe"), Component("router", "sinkhorn", TopK, "moe")]
    )
    with pytest.raises(UnknownComponentError) as info:
        registries.get("router", "topkk")
    message = str(info.value)
    assert "unknown router 'topkk'" in message
    assert "Known: sinkhorn, topk" in message
    assert "Did you mean 'topk'?" in message
    assert info.value.kind == "router" and info.value.name == "topkk"


def test_unknown_name_of_an_uninstalled_package_says_what_to_install() -> None:
    manager = PluginManager()  # nothing loaded: megatron-fsdp is not installed here
    with pytest.raises(UnknownComponentError, match="pip install megatron-fsdp"):
        manager.registries.get("data_parallel", "megatron_fsdp")
    with pytest.raises(UnknownComponentError, match="pip install mcore-moe"):
        manager.registries.get("flex_backend", "deepep")


def test_empty_kind_points_at_the_package_that_usually_fills_it() -> None:
    manager = PluginManager()
    with pytest.raises(UnknownComponentError, match="come with mcore-moe: pip install mcore-moe"):
        manager.registries.get("router", "anything")


def test_duplicate_name_is_refused_and_names_both_plugins() -> None:
    registries = Registries()
    registries.add_all([Component("router", "topk", TopK, "mcore-moe")])
    with pytest.raises(DuplicateComponentError) as info:
        registries.add_all([Component("router", "topk", MyTopK, "my-plugin")])
    assert "'mcore-moe'" in str(info.value) and "'my-plugin'" in str(info.value)
    assert "override=True" in str(info.value)
    assert registries.get("router", "topk") is TopK


@pytest.mark.parametrize("override_first", [False, True])
def test_override_wins_whatever_the_registration_order(override_first: bool) -> None:
    original = Component("router", "topk", TopK, "mcore-moe")
    replacement = Component("router", "topk", MyTopK, "my-plugin", override=True)
    registries = Registries()
    for c in [replacement, original] if override_first else [original, replacement]:
        registries.add_all([c])
    assert registries.get("router", "topk") is MyTopK
    registries.remove_plugin("my-plugin")
    assert registries.get("router", "topk") is TopK


def test_two_overrides_of_one_name_are_refused() -> None:
    registries = Registries()
    registries.add_all([Component("router", "topk", TopK, "a", override=True)])
    with pytest.raises(DuplicateComponentError, match="overridden by both"):
        registries.add_all([Component("router", "topk", MyTopK, "b", override=True)])


def test_a_plugins_components_are_added_all_or_nothing() -> None:
    registries = Registries()
    registries.add_all([Component("router", "topk", TopK, "moe")])
    batch = [
        Component("mlp", "fancy", TopK, "mine"),
        Component("router", "topk", MyTopK, "mine"),  # clashes
    ]
    with pytest.raises(DuplicateComponentError):
        registries.add_all(batch)
    assert "fancy" not in registries["mlp"]


def test_entries_are_checked_against_their_kind() -> None:
    @dataclass
    class Section:
        x: int = 1

    registries = Registries()
    registries.add_all([Component("config_section", "mine", Section, "p")])
    with pytest.raises(McoreError, match="must be a dataclass type"):
        registries.add_all([Component("config_section", "bad", {"x": 1}, "p")])
    with pytest.raises(McoreError, match="must be a mcore.core.CliCommand"):
        registries.add_all([Component("cli_command", "bad", print, "p")])
    with pytest.raises(McoreError, match="must be a callable"):
        registries.add_all([Component("router", "bad", 42, "p")])


def test_registrar_refuses_unknown_kinds_and_empty_names() -> None:
    registrar = PluginRegistrar("p")
    with pytest.raises(McoreError, match="unknown kind 'routers'.*router"):
        registrar.add("routers", "x", TopK)
    with pytest.raises(McoreError, match="with name ''"):
        registrar.add("router", "", TopK)
    with pytest.raises(McoreError, match="unknown registry kind 'nope'"):
        Registries()["nope"]


def test_lazy_entries_import_on_first_lookup() -> None:
    import sys

    from mcore.core import Lazy

    registries = Registries()
    registries.add_all(
        [
            Component("tokenizer", "split", Lazy("shlex:split"), "p"),
            Component("tokenizer", "missing", Lazy("no_such_module_xyz:thing"), "p"),
        ]
    )
    sys.modules.pop("shlex", None)
    assert registries.get("tokenizer", "split")("a 'b c'") == ["a", "b c"]
    with pytest.raises(McoreError, match="cannot import component 'no_such_module_xyz:thing'"):
        registries.get("tokenizer", "missing")


class HalfCheckpointer:
    """Saves, but cannot resume."""

    def save(self, iteration, chunks, optimizer, scheduler, loop_state): ...

    def poll(self): ...

    def finalize(self): ...


def test_a_kind_names_its_protocol_and_refuses_entries_lacking_members() -> None:
    kind = Kind(
        "thing",
        "things",
        "mcore-core",
        check=lambda obj: obj is not None,
        protocol="mcore.core.protocols:Checkpointer",
        builds=False,  # the entries are the checkpointers themselves
    )
    registry = Registry(kind, missing_hint=lambda kind, name: None)
    with pytest.raises(McoreError) as info:
        registry.add(Component("thing", "half", HalfCheckpointer(), "p"))
    assert str(info.value).startswith("plugin 'p' registered thing 'half' as <")
    assert "lacks `resume_path`, `load` of the thing protocol (mcore.core.protocols:" in str(
        info.value
    )
    assert registry.names() == []


def test_a_protocol_of_a_package_not_installed_checks_nothing() -> None:
    kind = Kind("thing", "things", "nowhere", protocol="not_installed_pkg.protocols:Thing")
    registry = Registry(kind, missing_hint=lambda kind, name: None)
    registry.add(Component("thing", "any", HalfCheckpointer, "p"))
    assert registry.get("any") is HalfCheckpointer


def test_every_kinds_protocol_is_a_protocol_of_its_home_package() -> None:
    for kind in KINDS.values():
        if not kind.protocol:
            continue
        module = kind.protocol.partition(":")[0]
        home = kind.provider.replace("mcore-", "mcore.").replace("-", "_")
        assert module.startswith(home), (kind.name, kind.protocol)
        if importlib.util.find_spec(home) is None:
            continue  # the owning package is not installed here
        protocol = Lazy(kind.protocol).resolve()
        assert getattr(protocol, "_is_protocol", False), kind.protocol
