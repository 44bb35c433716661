"""Triton kernels of mcore.moe, each wrapped in a ``torch.autograd.Function``.

Importing this package does not import Triton; :func:`load` does, so the torch paths of
``mcore.moe`` work where Triton is missing. Triton decides whether a kernel is compiled for the
GPU or run by its CPU interpreter when the kernel is defined, that is when its module is first
imported, from the environment variable ``TRITON_INTERPRET``; :func:`load` turns that into an
error that says what to do instead of a failure deep inside Triton.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

_TRUTHY = {"1", "true", "yes", "on", "y"}  # what Triton itself accepts for TRITON_INTERPRET


def is_interpreted(kernel: object) -> bool:
    """Whether ``kernel`` (a ``@triton.jit`` function) runs in Triton's CPU interpreter."""
    from triton.runtime.jit import JITFunction

    return not isinstance(kernel, JITFunction)


def load(module: str, what: str, *tensors: torch.Tensor | None) -> ModuleType:
    """Import ``mcore.moe.kernels.<module>`` and check its kernels can run on ``tensors``.

    ``what`` names the caller's operation in the errors. Raises ``RuntimeError`` rather than
    falling back to torch, so that asking for the fused path never silently measures the other.
    """
    try:
        import triton  # noqa: F401
    except ImportError as error:
        raise RuntimeError(
            f"{what} with fused=True needs Triton, which failed to import ({error}); install "
            "triton or pass fused=False for the torch path"
        ) from error
    kernels = importlib.import_module(f"mcore.moe.kernels.{module}")
    devices = sorted({str(t.device) for t in tensors if t is not None})
    if len(devices) > 1:
        raise RuntimeError(f"{what}: the tensors are on different devices {devices}; use one")
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if on_cuda or kernels.INTERPRETED:
        return kernels
    if os.environ.get("TRITON_INTERPRET", "0").lower() in _TRUTHY:
        raise RuntimeError(
            f"{what} with fused=True got tensors on {devices}: TRITON_INTERPRET is set, but only "
            f"after mcore.moe.kernels.{module} was imported, and Triton reads it when the kernels "
            "are defined; set it before the first fused call in the process"
        )
    raise RuntimeError(
        f"{what} with fused=True needs CUDA tensors (got {devices}), or TRITON_INTERPRET=1 set "
        "before the first fused call in the process to run the Triton kernels on the CPU "
        "(slowly); pass fused=False for the torch path"
    )


def block_size(n: int, cap: int = 1024) -> int:
    """The power-of-two block (``tl.arange`` needs one) for a dimension of size ``n``."""
    return max(16, min(cap, 1 << max(n - 1, 0).bit_length()))
