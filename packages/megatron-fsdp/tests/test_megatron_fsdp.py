"""megatron_fsdp stands alone; its mcore adapter adds the [fsdp] section."""

from __future__ import annotations

import subprocess
import sys

import pytest

import megatron_fsdp


def test_package_imports_without_touching_mcore() -> None:
    code = (
        "import sys, megatron_fsdp; "
        "print(sorted(m for m in sys.modules if m == 'mcore' or m.startswith('mcore.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert megatron_fsdp.__version__ == "0.1.0"
    assert megatron_fsdp.SHARDING_STRATEGIES == (
        "no_shard", "optim", "optim_grads", "optim_grads_params",
    )  # fmt: skip


def test_adapter_registers_the_fsdp_section() -> None:
    pytest.importorskip("mcore.core")
    from mcore.core import ConfigError, PluginManager, load_config
    from mcore.core import plugin as core_plugin
    from megatron_fsdp import mcore_adapter

    manager = PluginManager()
    manager.register(core_plugin, name="mcore-core")
    manager.register(mcore_adapter, name="megatron-fsdp")
    config = load_config(
        overrides={"fsdp.data-parallel-sharding-strategy": "optim_grads",
                   "train.data-parallel": "megatron_fsdp"},
        manager=manager,
    )  # fmt: skip
    assert config.fsdp.data_parallel_sharding_strategy == "optim_grads"
    with pytest.raises(ConfigError, match="must be one of 'no_shard', 'optim'"):
        load_config(overrides={"fsdp.data-parallel-sharding-strategy": "zero3"}, manager=manager)


def test_the_adapters_wrapper_satisfies_the_data_parallel_protocol() -> None:
    pytest.importorskip("mcore.parallel")
    from mcore.core import PluginManager
    from mcore.core.registry import missing_members
    from mcore.parallel.protocols import DataParallelWrapper
    from megatron_fsdp import mcore_adapter
    from megatron_fsdp.mcore_adapter.wrapper import MegatronFSDP

    manager = PluginManager()
    manager.register(mcore_adapter, name="megatron-fsdp")
    # Resolving the entry checks it; the wrapper it builds needs a process group, so its
    # class is checked here (the type checker checks the function's signature).
    wrap = manager.registries.get("data_parallel", "megatron_fsdp")
    assert wrap.accepts_meta_model is True
    assert missing_members(DataParallelWrapper, MegatronFSDP) == []
