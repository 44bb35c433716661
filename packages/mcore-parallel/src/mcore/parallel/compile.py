"""Regional compilation (``train.compile``): each module whose class sets
``compile_region = True`` (a transformer layer) is compiled on its own with ``torch.compile``.

Compiling layer by layer, rather than the whole model, keeps compile time to one graph per
layer kind (every layer of a kind shares its code, so the graph is reused) and leaves what sits
between layers (pipeline sends, data-parallel hooks, recompute checkpoints) eager, so it
composes with every parallel layout unchanged. A region that dynamo or the backend cannot
handle runs eagerly from its first failing call, with one warning per layer class.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from typing import Any

import torch

log = logging.getLogger(__name__)


def compile_regions(
    chunks: Iterable[torch.nn.Module], mode: str, backend: str, device: torch.device
) -> int:
    """Compile the regions of ``chunks`` as ``train.compile`` (``mode``) and
    ``train.compile_backend`` say; returns how many modules were compiled."""
    if mode == "off":
        return 0
    if mode == "auto" and device.type != "cuda":
        log.info(
            "train.compile auto: layers run eagerly on %s (compiling costs more than a short "
            "run there saves); --train.compile on compiles them",
            device.type,
        )
        return 0
    missing = _missing_toolchain(backend, device)
    if missing:
        log.warning("train.compile: layers run eagerly: %s", missing)
        return 0
    regions = [
        m for chunk in chunks for m in chunk.modules() if getattr(type(m), "compile_region", False)
    ]
    failed: set[type] = set()
    for module in regions:
        _compile(module, backend, failed)
    log.info("train.compile: %d regions compiled (backend %s)", len(regions), backend)
    return len(regions)


def _compile(module: torch.nn.Module, backend: str, failed: set[type]) -> None:
    """``module.compile(backend=...)`` with an eager fallback on the first failing call."""
    compiled = torch.compile(module._call_impl, backend=backend)

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled(*args, **kwargs)
        # torch.compile imported torch._dynamo, which imports its exc submodule
        except torch._dynamo.exc.TorchDynamoException as exc:  # pyright: ignore[reportAttributeAccessIssue]
            module._compiled_call_impl = None  # eager from now on
            if type(module) not in failed:
                failed.add(type(module))
                log.warning(
                    "train.compile: %s layers run eagerly, compiling failed: %s",
                    type(module).__name__,
                    _reason(exc),
                )
            return module._call_impl(*args, **kwargs)

    module._compiled_call_impl = call


def _reason(exc: BaseException) -> str:
    """The root cause of a compile failure, in one line."""
    root = getattr(exc, "inner_exception", None) or exc
    while root.__cause__ is not None:
        root = root.__cause__
    lines = str(root).strip().splitlines()
    return f"{type(root).__name__}: {lines[0] if lines else ''}"


def _missing_toolchain(backend: str, device: torch.device) -> str | None:
    """What inductor lacks on this machine to generate kernels, or ``None``."""
    if backend != "inductor":
        return None
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "inductor needs triton on CUDA (pip install triton)"
    from torch._inductor import config as inductor_config

    cxx = inductor_config.cpp.cxx
    names = [c for c in (cxx if isinstance(cxx, tuple) else (cxx,)) if c]
    if not any(shutil.which(c) for c in names or ("g++", "clang++")):
        return "inductor needs a C++ compiler on CPU (g++ or clang++ on PATH)"
    return None
