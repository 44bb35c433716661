"""Triton kernels of mcore.ssm (the ``[triton]`` extra); importing this package imports no Triton.

:func:`load` imports a kernel module (and with it Triton) and checks that its kernels can run on
the given tensors. Triton fixes, when a kernel is defined (at the first import of its module),
whether it is compiled for the GPU or run by the CPU interpreter, from ``TRITON_INTERPRET``; so
CPU tensors work only if that variable was set before the import, and the errors here say so
instead of failing deep inside Triton.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

_TRUTHY = {"1", "true", "yes", "on", "y"}  # the values Triton takes as "set"


def is_interpreted(kernel: object) -> bool:
    """Whether ``kernel`` (a ``@triton.jit`` function) runs in Triton's CPU interpreter."""
    from triton.runtime.jit import JITFunction

    return not isinstance(kernel, JITFunction)


def check_device(module: str, interpreted: bool, what: str, *tensors: torch.Tensor | None) -> None:
    """Raise ``RuntimeError`` unless ``module``'s kernels can run on ``tensors``.

    They can on one CUDA device, or on the CPU when the module's kernels are ``interpreted``.
    """
    devices = sorted({str(t.device) for t in tensors if t is not None})
    if len(devices) > 1:
        raise RuntimeError(f"{what}: the tensors are on different devices {devices}; use one")
    if interpreted or all(t.is_cuda for t in tensors if t is not None):
        return
    if os.environ.get("TRITON_INTERPRET", "0").lower() in _TRUTHY:
        raise RuntimeError(
            f"{what} got tensors on {devices}: TRITON_INTERPRET is set, but only after {module} "
            "was imported, and Triton reads it when the kernels are defined; set it before the "
            "first Triton call in the process"
        )
    raise RuntimeError(
        f"{what} needs CUDA tensors (got {devices}), or TRITON_INTERPRET=1 set before the first "
        "Triton call in the process to run the kernels on the CPU (slowly); use the torch "
        "functions of mcore.ssm.ssd otherwise"
    )


def load(module: str, what: str, *tensors: torch.Tensor | None) -> ModuleType:
    """Import ``mcore.ssm.kernels.<module>`` and check its kernels can run on ``tensors``.

    ``what`` names the caller's operation in the errors. Raises ``RuntimeError`` (never falls
    back to torch, so that asking for the kernels cannot silently measure the other path).
    """
    try:
        import triton  # noqa: F401
    except ImportError as error:
        raise RuntimeError(
            f"{what} needs Triton, which failed to import ({error}); install mcore-ssm[triton] "
            "or use the torch functions of mcore.ssm.ssd"
        ) from error
    name = f"mcore.ssm.kernels.{module}"
    kernels = importlib.import_module(name)
    check_device(name, kernels.INTERPRETED, what, *tensors)
    return kernels


def block_size(n: int, low: int = 16, high: int = 1024) -> int:
    """The power of two (``tl.arange`` needs one) in ``[low, high]`` that best covers ``n``."""
    return max(low, min(high, 1 << max(n - 1, 0).bit_length()))
