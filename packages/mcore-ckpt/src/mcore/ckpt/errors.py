"""The one exception checkpoint code raises: what is wrong with which checkpoint, and the fix."""

from __future__ import annotations

from mcore.core import McoreError


class CheckpointingException(McoreError):
    """A checkpoint cannot be written or read; the message names the path and what to do."""
