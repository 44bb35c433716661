"""megatron-rl's extension points are typed protocols: every registered environment and agent
builds an :class:`~megatron_rl.envs.base.Environment` / :class:`~megatron_rl.agents.Agent`,
and the registries refuse ones that lack a member, naming the kind, the entry and the
members."""

from __future__ import annotations

import pytest

from mcore.core import McoreError, PluginManager, get_plugin_manager, hookimpl
from megatron_rl.agents import Agent, build_agent
from megatron_rl.envs.base import Environment, Problem, build_environment


def test_every_registered_environment_and_agent_satisfies_its_protocol(tiny) -> None:
    config = tiny()
    registries = get_plugin_manager().registries
    for name in registries.names("rl_env"):
        env = build_environment(registries, name, config)
        assert isinstance(env, Environment), name
        assert isinstance(env.problem(0), Problem)
    for name in registries.names("rl_agent"):
        assert isinstance(build_agent(registries, name, config), Agent), name


class Unscored:
    """An environment without a verifier."""

    name = "unscored"

    def __init__(self, config) -> None: ...

    def problem(self, index: int) -> Problem:
        return Problem(prompt=str(index))


def _register(kind: str, entry: object) -> PluginManager:
    class Plugin:
        @hookimpl
        def mcore_register(self, registry) -> None:
            registry.add(kind, "mine", entry)

    manager = PluginManager()
    manager.register(Plugin(), name="mine")
    return manager


def test_an_environment_class_lacking_members_is_refused() -> None:
    with pytest.raises(McoreError) as info:
        _register("rl_env", Unscored)
    message = str(info.value)
    assert "registered rl_env 'mine'" in message
    assert "lacks `score` of the rl env protocol (megatron_rl.envs.base:Environment)" in message


def test_what_a_factory_builds_is_checked_when_built(tiny) -> None:
    manager = _register("rl_agent", lambda config: Unscored(config))
    with pytest.raises(McoreError, match=r"rl_agent 'mine' .* built a Unscored, which lacks `run`"):
        build_agent(manager.registries, "mine", tiny())
