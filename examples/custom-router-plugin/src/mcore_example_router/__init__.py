"""An example mcore plugin: :class:`RandomRouter`, registered as router ``example_random``."""

from __future__ import annotations

from typing import Any

__all__ = ["RandomRouter"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so that loading the plugin (which imports this package) stays
    # free of torch and mcore-moe.
    if name == "RandomRouter":
        from mcore_example_router.router import RandomRouter

        return RandomRouter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
