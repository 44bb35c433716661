"""mcore-parallel's extension points are typed protocols: the ``data_parallel`` entries build
:class:`~mcore.parallel.protocols.DataParallelWrapper` s and the ``mcore_training_runtime``
hook returns the core's :class:`~mcore.core.protocols.TrainingRuntime`; the registry refuses a
wrapper that lacks a member."""

from __future__ import annotations

import pytest
from torch import nn

from mcore.core import McoreError, PluginManager, hookimpl, load_config
from mcore.core.protocols import ReadsMetrics, TrainingRuntime
from mcore.parallel import ParallelState
from mcore.parallel.protocols import DataParallelWrapper, data_parallel_builder


@pytest.fixture
def manager() -> PluginManager:
    return PluginManager().load_entry_points(only=["mcore-parallel"])


def test_the_ddp_entry_builds_a_data_parallel_wrapper(manager) -> None:
    config = load_config(manager=manager)
    wrap = data_parallel_builder(manager.registries, "ddp")
    wrapped = wrap(nn.Linear(4, 4), ParallelState(), config)
    assert isinstance(wrapped, DataParallelWrapper) and isinstance(wrapped, nn.Module)
    assert not getattr(wrap, "accepts_meta_model", False)


def test_the_runtime_hook_returns_a_training_runtime_that_reads_metrics(manager) -> None:
    runtime = manager.hook.mcore_training_runtime(config=load_config(manager=manager))
    assert isinstance(runtime, TrainingRuntime) and isinstance(runtime, ReadsMetrics)
    assert runtime.parallel_state.world_size == 1


class NoSync(nn.Module):
    """A wrapper that cannot finish its gradient reduction."""

    def __init__(self, module, parallel_state, config) -> None:
        super().__init__()
        self.module = module

    def no_sync(self): ...


def _register(entry: object) -> PluginManager:
    class Plugin:
        @hookimpl
        def mcore_register(self, registry) -> None:
            registry.add("data_parallel", "mine", entry)

    manager = PluginManager()
    manager.register(Plugin(), name="mine")
    return manager


def test_a_wrapper_lacking_members_is_refused() -> None:
    with pytest.raises(McoreError) as info:
        _register(NoSync)
    message = str(info.value)
    assert "registered data_parallel 'mine'" in message
    assert "lacks `finish_grad_sync` of the data parallel protocol" in message
    assert "mcore.parallel.protocols:DataParallelWrapper" in message


def test_what_a_wrapping_function_returns_is_checked_when_built() -> None:
    registry = _register(lambda model, parallel_state, config: model).registries["data_parallel"]
    with pytest.raises(McoreError, match=r"'mine' .* built a Linear, which lacks `no_sync`"):
        registry.build("mine", nn.Linear(2, 2), ParallelState(), None)
