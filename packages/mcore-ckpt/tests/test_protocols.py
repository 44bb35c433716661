"""mcore-ckpt's extension points are typed protocols: every registered checkpoint format is a
:class:`~mcore.ckpt.protocols.CheckpointFormat`, the ``mcore_checkpointer`` hook returns the
core's :class:`~mcore.core.protocols.Checkpointer`, and the ``checkpoint_format`` registry
refuses a format that lacks a member."""

from __future__ import annotations

import types

import pytest

from mcore.ckpt.protocols import CheckpointFormat
from mcore.core import McoreError, PluginManager, hookimpl, load_config
from mcore.core.protocols import Checkpointer
from mcore.parallel import ParallelState


@pytest.fixture
def manager() -> PluginManager:
    return PluginManager().load_entry_points(only=["mcore-ckpt"])


def test_every_registered_format_is_a_checkpoint_format(manager) -> None:
    for name in manager.registries.names("checkpoint_format"):
        fmt = manager.registries.get("checkpoint_format", name)
        assert isinstance(fmt, CheckpointFormat), name
        assert fmt.name == name


def test_the_checkpointer_hook_returns_a_checkpointer(manager) -> None:
    config = load_config(manager=manager)
    runtime = types.SimpleNamespace(parallel_state=ParallelState())
    checkpointer = manager.hook.mcore_checkpointer(config=config, runtime=runtime)
    assert isinstance(checkpointer, Checkpointer)
    assert checkpointer.resume_path() is None and checkpointer.finalize() == []


class WritesOnly:
    """A format that can save but never load."""

    name = "writes_only"
    supports_async = False
    weights_only = True

    def prepare(self, chunks, optimizer): ...

    def write(self, folder, prepared, *, group, abort=None): ...

    def describe(self, folder): ...


def test_a_format_lacking_members_is_refused() -> None:
    class Plugin:
        @hookimpl
        def mcore_register(self, registry) -> None:
            registry.add("checkpoint_format", "writes_only", WritesOnly())

    with pytest.raises(McoreError) as info:
        PluginManager().register(Plugin(), name="writes-only")
    message = str(info.value)
    assert "registered checkpoint_format 'writes_only'" in message
    assert "lacks `load`, `load_model` of the checkpoint format protocol" in message
    assert "mcore.ckpt.protocols:CheckpointFormat" in message
