"""Configuration: defaults < TOML file < overrides; typed fields; errors name the field."""

from __future__ import annotations

import argparse
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from mcore.core import ConfigError, McoreError, hookimpl, load_config
from mcore.core.config import (
    ConfigErrors,
    add_config_arguments,
    build_config,
    check_components,
    field_docs,
    normalize_flags,
    overrides_from_args,
    parse_overrides,
)


class Mode(enum.Enum):
    FAST = "fast"
    SAFE = "safe"


@dataclass(kw_only=True)
class Demo:
    """A section exercising every supported field type."""

    steps: int = 10
    """How many steps."""
    rate: float = 0.5
    """A rate in (0, 1)."""
    name: str = "demo"
    """A label."""
    enabled: bool = False
    """Turn the demo on."""
    shape: list[int] = field(default_factory=lambda: [2, 3])
    """A list of ints."""
    maybe: int | None = None
    """An optional int."""
    style: Literal["a", "b"] = "a"
    """One of two styles."""
    mode: Mode = Mode.FAST
    """An enum."""
    extra: dict[str, float] = field(default_factory=dict)
    """A table of floats."""
    where: Path = Path("/tmp")
    """A path."""

    def validate(self, errors: ConfigErrors) -> None:
        if not 0 < self.rate < 1:
            errors.add("rate", f"must lie in (0, 1), got {self.rate}")


SECTIONS = {"demo": Demo}


def build(values=None, overrides=()) -> object:
    errors = ConfigErrors()
    merged = dict(values or {})
    for section, table in parse_overrides(overrides, SECTIONS, errors).items():
        merged[section] = {**merged.get(section, {}), **table}
    return build_config(merged, SECTIONS, errors=errors)


def test_defaults_apply_when_nothing_is_given() -> None:
    config = build()
    assert config.demo == Demo()
    assert config.section_names() == ["demo"]


def test_toml_values_are_type_checked_and_converted() -> None:
    config = build(
        {"demo": {"steps": 3, "rate": 1 / 4, "shape": [4], "mode": "safe", "extra": {"a": 1}}}
    )
    assert config.demo.steps == 3
    assert config.demo.mode is Mode.SAFE
    assert config.demo.extra == {"a": 1.0} and isinstance(config.demo.extra["a"], float)


def test_command_line_text_parses_into_each_type() -> None:
    config = build(
        overrides=[
            "demo.steps=7",
            "demo.rate=0.25",
            "demo.enabled=yes",
            "demo.shape=1,2,3",
            "demo.maybe=5",
            "demo.style=b",
            "demo.mode=safe",
            "demo.extra={x = 2.5}",
            "demo.where=/data",
        ]
    )
    d = config.demo
    assert (d.steps, d.rate, d.enabled, d.shape, d.maybe) == (7, 0.25, True, [1, 2, 3], 5)
    assert (d.style, d.mode, d.extra, d.where) == ("b", Mode.SAFE, {"x": 2.5}, Path("/data"))
    assert build(overrides=["demo.shape=[8, 9]", "demo.maybe=none"]).demo.shape == [8, 9]


def test_every_problem_is_reported_at_once_naming_its_field() -> None:
    with pytest.raises(ConfigError) as info:
        build(
            {"demo": {"steps": "ten", "styl": "a", "rate": 2.0}},
            overrides=["demo.enabled=maybe", "demo.style=c"],
        )
    errors = info.value.errors
    assert "demo.steps: expected int, got 'ten' (str)" in errors
    assert any(e.startswith("demo.styl: unknown field") and "'style'" in e for e in errors)
    assert "demo.enabled: expected a boolean (true/false), got 'maybe'" in errors
    assert "demo.style: must be one of 'a', 'b', got 'c'" in errors
    assert "demo.rate: must lie in (0, 1), got 2.0" in errors
    assert str(info.value).startswith("invalid configuration (5 errors):")


def test_booleans_are_not_integers_and_integers_not_booleans() -> None:
    with pytest.raises(ConfigError, match="demo.steps: expected int, got True"):
        build({"demo": {"steps": True}})
    with pytest.raises(ConfigError, match="demo.enabled: expected bool, got 1"):
        build({"demo": {"enabled": 1}})


def test_unknown_section_suggests_the_closest_one() -> None:
    with pytest.raises(ConfigError, match=r"dem: unknown config section.*Did you mean \[demo\]"):
        build({"dem": {"steps": 1}})


def test_dashes_and_underscores_are_the_same_field() -> None:
    @dataclass(kw_only=True)
    class S:
        max_steps: int = 1

    config = build_config({"s": {"max-steps": 4}}, {"s": S})
    assert config.s.max_steps == 4
    assert normalize_flags(["--s.max_steps=3", "--s.max_steps", "x", "--plain_flag"]) == [
        "--s.max-steps=3",
        "--s.max-steps",
        "x",
        "--plain_flag",
    ]


def test_field_without_default_is_required() -> None:
    @dataclass(kw_only=True)
    class S:
        path: str

    with pytest.raises(ConfigError, match="s.path: is required and has no default"):
        build_config({}, {"s": S})
    assert build_config({"s": {"path": "x"}}, {"s": S}).s.path == "x"


def test_field_docstrings_are_the_help_text() -> None:
    docs = field_docs(Demo)
    assert docs["steps"] == "How many steps."
    assert docs["extra"] == "A table of floats."


def test_argparse_flags_are_generated_from_fields_with_help() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_config_arguments(parser, SECTIONS, owners={"demo": "demo-plugin"})
    text = parser.format_help()
    assert "[demo] section (from demo-plugin)" in text
    assert "--demo.steps INT" in text and "How many steps. (default: 10)" in text
    assert "--demo.style {a,b}" in text
    args = parser.parse_args(["--demo.steps", "4", "--demo.enabled"])
    assert overrides_from_args(args) == {"demo.steps": "4", "demo.enabled": "true"}
    assert build(overrides=overrides_from_args(args)).demo.enabled is True


def test_toml_round_trip_gives_an_equal_config(tmp_path: Path) -> None:
    config = build(overrides=["demo.maybe=3", "demo.extra={a = 1.5}", 'demo.name=quote"d'])
    path = tmp_path / "run.toml"
    path.write_text(config.to_toml())
    import tomllib

    assert build(tomllib.loads(path.read_text())) == config


# --- the real sections, through the installed plugins ------------------------------------------


def test_file_then_overrides_take_precedence(core_manager, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[train]\ntrain_iters = 50\nmicro_batch_size = 2\n[optimizer]\nlr = 1e-3\n")
    config = load_config(recipe, {"train.train-iters": "7"}, manager=core_manager)
    assert config.train.train_iters == 7  # override beats file
    assert config.train.micro_batch_size == 2  # file beats default
    assert config.optimizer.lr == 1e-3
    assert config.train.seed == 1234  # default


def test_bad_files_are_named(core_manager, tmp_path: Path) -> None:
    with pytest.raises(McoreError, match="does not exist"):
        load_config(tmp_path / "missing.toml", manager=core_manager)
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\n")
    with pytest.raises(McoreError, match="broken.toml' is not valid TOML"):
        load_config(broken, manager=core_manager)
    flat = tmp_path / "flat.toml"
    flat.write_text("train = 3\n")
    with pytest.raises(ConfigError, match=r"train: must be a table \(\[train\]\), got 3"):
        load_config(flat, manager=core_manager)


def test_section_of_an_uninstalled_package_says_what_to_install(core_manager) -> None:
    with pytest.raises(
        ConfigError, match=r"moe: unknown config section\. Sections: train, .*pip install mcore-moe"
    ):
        load_config(overrides={"moe.num_experts": "8"}, manager=core_manager)


def test_core_sections_validate_their_fields(core_manager) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            overrides={
                "train.bf16": "true",
                "train.fp16": "true",
                "train.global-batch-size": "10",
                "train.micro-batch-size": "4",
                "optimizer.lr-decay-style": "WSD",
                "checkpoint.async-save": "true",
            },
            manager=core_manager,
        )
    assert info.value.errors == [
        "train.fp16: bf16 and fp16 are mutually exclusive; choose one",
        "train.global_batch_size: must be a multiple of micro_batch_size (4), got 10",
        "optimizer.lr_wsd_decay_iters: is required when lr_decay_style is 'WSD'",
        "checkpoint.async_save: needs checkpoint.save to be set",
    ]


def test_component_fields_resolve_in_the_registries(core_manager) -> None:
    class Adam:
        pass

    class P:
        @hookimpl
        def mcore_register(self, registry):
            registry.add("optimizer", "adam", Adam)

    core_manager.register(P(), name="optim")
    config = load_config(manager=core_manager)
    problems = check_components(config, core_manager.registries)
    assert not any(p.startswith("optimizer.optimizer") for p in problems)
    assert any(p.startswith("train.data_parallel: unknown data parallel 'ddp'") for p in problems)


def test_aliases_name_a_field_in_files_overrides_and_flags() -> None:
    @dataclass(kw_only=True)
    class Par:
        tensor_model_parallel_size: int = field(default=1, metadata={"aliases": ("tp",)})
        """Tensor-parallel ranks."""

    sections = {"parallel": Par}
    assert build_config({"parallel": {"tp": 2}}, sections).parallel.tensor_model_parallel_size == 2
    parsed = parse_overrides(["parallel.tp=4"], sections)
    assert parsed == {"parallel": {"tensor_model_parallel_size": 4}}
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_config_arguments(parser, sections, owners={})
    args = parser.parse_args(["--parallel.tp", "8"])
    assert overrides_from_args(args) == {"parallel.tensor_model_parallel_size": "8"}
