"""An example mcore plugin: :class:`RandomRouter`, registered as router ``example_random``."""

from __future__ import annotations

from mcore_example_router.router import RandomRouter

__all__ = ["RandomRouter"]
