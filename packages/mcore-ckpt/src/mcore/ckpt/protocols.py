"""The extension point of mcore-ckpt: checkpoint formats (the ``checkpoint_format`` kind).

A format turns this rank's training state into files in a folder and back. The registry holds
the format object itself (``torch_dist``, ``fsdp_dtensor`` and ``hf`` are instances of
:mod:`mcore.ckpt.formats`' classes) and refuses one that lacks a member of
:class:`CheckpointFormat`. :class:`~mcore.ckpt.checkpointer.Checkpointer` saves and resumes
through it, ``mcore ckpt`` inspects and converts through it, and inference and distillation
load weights through :meth:`CheckpointFormat.load_model`. A format that cannot do something
(``hf`` cannot resume a run) still has the member and raises a
:class:`~mcore.ckpt.errors.CheckpointingException` that says what to do instead.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import nn
    from torch.distributed import ProcessGroup

__all__ = ["CheckpointFormat"]


@runtime_checkable
class CheckpointFormat(Protocol):
    """What a checkpoint format implements (see the module docstring)."""

    name: str
    """The registry name, recorded as ``format`` in each checkpoint's ``common.json``."""
    supports_async: bool
    """Whether :meth:`write` may run on a background thread (``checkpoint.async_save``)."""
    weights_only: bool
    """Whether the format stores the model's weights alone (no optimizer state)."""

    def prepare(self, chunks: list[nn.Module], optimizer: Any) -> Any:
        """What :meth:`write` will write, taken on the training thread (it may copy)."""
        ...

    def write(
        self,
        folder: Path,
        prepared: Any,
        *,
        group: ProcessGroup | None,
        abort: threading.Event | None = None,
    ) -> dict[str, dict[str, int]]:
        """Write this rank's files of ``prepared`` into ``folder`` and return them as
        ``{file: {"size", "crc32"}}``. May run on a background thread, so it touches only
        ``prepared``; stops between files once ``abort`` is set. ``group`` carries the
        checkpoint's collectives."""
        ...

    def load(
        self,
        folder: Path,
        chunks: list[nn.Module],
        optimizer: Any,
        *,
        group: ProcessGroup | None,
        common: dict[str, Any],
        verify_checksums: bool = True,
    ) -> None:
        """Load the training state in place, resharding to this run's layout; ``optimizer``
        may be ``None`` (weights only). ``common`` is the checkpoint's ``common.json``."""
        ...

    def load_model(self, folder: Path, model: nn.Module) -> None:
        """Load only the weights into ``model`` of any layout, on this process alone
        (inference, export, a distillation teacher): no optimizer state, no collectives."""
        ...

    def describe(self, folder: Path) -> list[dict[str, Any]]:
        """The stored tensors: ``[{"key", "shape", "dtype", "bytes"}]``."""
        ...


if TYPE_CHECKING:
    # The built-in formats conform: the type checker verifies these assignments.
    from mcore.ckpt.formats import FSDP_DTENSOR, HF, TORCH_DIST

    _FORMATS: list[CheckpointFormat] = [TORCH_DIST, FSDP_DTENSOR, HF]
