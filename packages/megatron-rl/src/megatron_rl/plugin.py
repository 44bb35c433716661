"""megatron-rl's plugin: the ``[rl]`` section, ``mcore rl``, environments, agents and the
``char`` tokenizer. Everything that imports torch is registered lazily."""

from __future__ import annotations

from mcore.core import Lazy, PluginRegistrar, hookimpl
from megatron_rl.cli import RL
from megatron_rl.config import RLConfig

ENVS = {
    "arithmetic": "megatron_rl.envs.arithmetic:build_arithmetic",
    "string_copy": "megatron_rl.envs.string_task:build_string_copy",
    "string_reverse": "megatron_rl.envs.string_task:build_string_reverse",
    "math_answer": "megatron_rl.envs.math_answer:build_math_answer",
}
AGENTS = {
    "single_turn": "megatron_rl.agents:build_single_turn",
    "multi_turn": "megatron_rl.agents:build_multi_turn",
}


@hookimpl
def mcore_register(registry: PluginRegistrar) -> None:
    registry.add("config_section", "rl", RLConfig)
    registry.add("cli_command", "rl", RL)
    registry.add("tokenizer", "char", Lazy("megatron_rl.tokenizer:build_char_tokenizer"))
    for name, target in ENVS.items():
        registry.add("rl_env", name, Lazy(target))
    for name, target in AGENTS.items():
        registry.add("rl_agent", name, Lazy(target))
