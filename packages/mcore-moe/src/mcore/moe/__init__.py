"""mcore.moe: mixture-of-experts layers whose routers and dispatchers are plugins."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mcore.core.lazy import lazy_exports
from mcore.moe.config import MoEConfig

# Names resolve on first use, so loading this package's plugin does not import torch.
_EXPORTS = {
    "DispatchOutput": "mcore.moe.dispatcher",
    "GroupedMLP": "mcore.moe.experts",
    "MoELayer": "mcore.moe.layer",
    "Router": "mcore.moe.router",
    "RouterOutput": "mcore.moe.router",
    "RouterReplay": "mcore.moe.replay",
    "SharedExpertMLP": "mcore.moe.experts",
    "TokenDispatcher": "mcore.moe.dispatcher",
    "TopKRouter": "mcore.moe.router",
}

__all__ = [
    "DispatchOutput",
    "GroupedMLP",
    "MoEConfig",
    "MoELayer",
    "Router",
    "RouterOutput",
    "RouterReplay",
    "SharedExpertMLP",
    "TokenDispatcher",
    "TopKRouter",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from mcore.moe.dispatcher import DispatchOutput, TokenDispatcher
    from mcore.moe.experts import GroupedMLP, SharedExpertMLP
    from mcore.moe.layer import MoELayer
    from mcore.moe.replay import RouterReplay
    from mcore.moe.router import Router, RouterOutput, TopKRouter
