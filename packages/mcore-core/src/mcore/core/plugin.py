"""The core's own plugin: its config sections, CLI sub-commands, tokenizers and datasets."""

from __future__ import annotations

from mcore.core.commands import CONFIG, PLUGINS
from mcore.core.data.cli import DATA
from mcore.core.hookspecs import hookimpl
from mcore.core.registry import Lazy, PluginRegistrar
from mcore.core.sections import CORE_SECTIONS
from mcore.core.training.cli import TRAIN
from mcore.core.training.plot import PLOT


@hookimpl
def mcore_register(registry: PluginRegistrar) -> None:
    for name, section in CORE_SECTIONS.items():
        registry.add("config_section", name, section)
    registry.add("cli_command", "plugins", PLUGINS)
    registry.add("cli_command", "config", CONFIG)
    registry.add("cli_command", "data", DATA)
    registry.add("cli_command", "train", TRAIN)
    registry.add("cli_command", "plot", PLOT)
    # Lazy: loading plugins must not import numpy, torch or tokenizers
    registry.add("tokenizer", "byte", Lazy("mcore.core.data.tokenizer:build_byte_tokenizer"))
    registry.add("tokenizer", "hf", Lazy("mcore.core.data.tokenizer:build_hf_tokenizer"))
    registry.add("dataset", "python_stdlib", Lazy("mcore.core.data.corpus:build_python_stdlib"))
    registry.add("dataset", "indexed", Lazy("mcore.core.data.corpus:build_indexed"))
