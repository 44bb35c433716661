"""Which implementation runs the scans: the torch reference or the Triton kernels.

``[ssm] ssm_kernel`` picks one for every ``M`` and ``G`` layer. The Triton kernels live in
``mcore.ssm.kernels`` and are imported only when asked for, so the torch path needs no Triton.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

_FUNCTIONS = {
    ("torch", "mamba"): ("mcore.ssm.ssd", "ssd_scan", "ssd_step"),
    ("torch", "gdn"): ("mcore.ssm.gated_delta", "gated_delta_rule", "gated_delta_step"),
    ("triton", "mamba"): ("mcore.ssm.kernels.ssd", "ssd_scan_triton", "ssd_step_triton"),
    ("triton", "gdn"): (
        "mcore.ssm.kernels.gated_delta",
        "gated_delta_rule_triton",
        "gated_delta_step_triton",
    ),
}


def scan_functions(kernel: str, kind: Literal["mamba", "gdn"]) -> tuple[Callable, Callable]:
    """``(scan, step)`` of ``kind`` for the ``ssm_kernel`` named ``kernel``."""
    import importlib

    try:
        module, scan, step = _FUNCTIONS[(kernel, kind)]
    except KeyError:
        raise ValueError(f"ssm.ssm_kernel must be 'torch' or 'triton', got {kernel!r}") from None
    try:
        loaded = importlib.import_module(module)
    except ImportError as error:
        raise RuntimeError(
            f"ssm.ssm_kernel = {kernel!r} needs {module}, which failed to import ({error}); "
            "install mcore-ssm[triton] or set ssm.ssm_kernel = 'torch'"
        ) from error
    return getattr(loaded, scan), getattr(loaded, step)
