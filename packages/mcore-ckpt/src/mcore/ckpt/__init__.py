"""mcore.ckpt: sharded checkpoints that reshard on load, with formats as plugins.

Names load on first use, so the plugin (and ``mcore plugins``) import no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mcore.core.lazy import lazy_exports

SUPPORTED_FORMATS = ("torch_dist", "fsdp_dtensor", "hf")

_EXPORTS = {
    "CheckpointingException": "mcore.ckpt.errors",
    "Checkpointer": "mcore.ckpt.checkpointer",
    "get_format": "mcore.ckpt.formats",
    "read_common": "mcore.ckpt.checkpointer",
    "resolve": "mcore.ckpt.directory",
}

__all__ = [
    "SUPPORTED_FORMATS",
    "Checkpointer",
    "CheckpointingException",
    "get_format",
    "read_common",
    "resolve",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from mcore.ckpt.checkpointer import Checkpointer, read_common
    from mcore.ckpt.directory import resolve
    from mcore.ckpt.errors import CheckpointingException
    from mcore.ckpt.formats import get_format
