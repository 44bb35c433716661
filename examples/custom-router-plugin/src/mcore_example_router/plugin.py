"""The plugin module named by the ``mcore`` entry point in this package's pyproject.toml.

mcore imports it when it loads plugins and calls every ``@hookimpl`` function in it that is named
after a hook in :mod:`mcore.core.hookspecs`. ``mcore_register`` is the only one most plugins need.
"""

from __future__ import annotations

from mcore.core import Lazy, PluginRegistrar, hookimpl


@hookimpl
def mcore_register(registry: PluginRegistrar) -> None:
    # Select it in a run with `--moe.router-type example_random` (mcore-moe's [moe] section).
    # Registered by import path: `mcore plugins` and config checks then never import torch,
    # and the router module is imported the first time a model builds it.
    registry.add("router", "example_random", Lazy("mcore_example_router.router:RandomRouter"))
