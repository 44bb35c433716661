"""mcore.moe: mixture-of-experts layers whose routers and dispatchers are plugins."""

from mcore.moe.config import MoEConfig

__all__ = ["MoEConfig"]
