"""Linear layers on CPU through oneDNN, their weights reordered once into its blocked layout.

``F.linear`` on a CPU hands each call's weight to the BLAS, which repacks it into its own
blocked layout every time; at decode sizes (a few dozen rows against a weight of millions) the
repacking costs as much as the product. Here each parallel linear layer's ``kernel`` keeps the
weight reordered for oneDNN and runs its GEMM on that (what ``torch.compile``'s freezing does
on CPU): 1.3-2.5x faster for 8 to 512 rows against weights of 0.4M-12M elements (measured on
an AVX-512 server CPU). Below ``min_elements`` (default 3 * 2**16, a 768 x 256 weight) the
fixed cost of a oneDNN call outweighs that, and for a single row (one decoding request) the
BLAS's matrix-vector path is about as fast: those calls stay on ``F.linear``. Two and three
rows (a few decoding requests; a request verifying its speculative drafts) are where the BLAS
is slowest: 1.3-4x slower than packed on the 2-core development machine (a 2048 x 512 weight:
335 against 85 us for three rows).

A packed weight is redone when its tensor changes in place (its version counter moves:
``update_weights``, an optimiser step of a model shared with training) or when the layer is
called with another weight; with autograd on, or for anything but fp32 on a CPU, the layer
runs ``F.linear`` as before. The packed copies take as much memory again as the weights.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F

from mcore.parallel import ColumnParallelLinear, RowParallelLinear
from mcore.parallel.tensor_parallel import apply_linear_backend

log = logging.getLogger(__name__)

_LAYERS = (ColumnParallelLinear, RowParallelLinear)
_MIN_ROWS = 2


def packing_available() -> bool:
    """Whether this PyTorch build has oneDNN's linear with prepacked weights."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


class PackedLinear:
    """A ``LinearKernel``: ``x weightᵀ + bias`` over a oneDNN copy of ``weight``."""

    def __init__(self) -> None:
        self._weight: torch.Tensor | None = None
        self._version = -1
        self._packed: torch.Tensor | None = None

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if (
            torch.is_grad_enabled()
            or x.numel() < _MIN_ROWS * x.shape[-1]
            or weight.device.type != "cpu"
            or weight.dtype != torch.float32
            or x.dtype != torch.float32
            or weight.is_inference()
        ):
            return F.linear(x, weight, bias)
        if weight is not self._weight or weight._version != self._version:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(
                weight.detach().contiguous(), None
            )
            self._weight, self._version = weight, weight._version
        # oneDNN reads the input as dense rows: a strided view would come out wrong.
        return torch.ops.mkldnn._linear_pointwise(
            x.contiguous(), self._packed, bias, "none", [], ""
        )


_MIN_ELEMENTS = 3 * 2**16


def onednn_packed(layer: Any, *, min_elements: int = _MIN_ELEMENTS) -> PackedLinear | None:
    """The ``linear_backend`` entry ``onednn_packed``: a :class:`PackedLinear` for a layer
    whose weight has at least ``min_elements`` (None where this build has no oneDNN). A layer
    given its weight at call time (a tied output layer) is sized by the in and out features it
    was built for."""
    if not packing_available():
        return None
    if layer.in_features * layer.out_features // layer.tp_size < min_elements:
        return None
    return PackedLinear()


def pack_linears(model: torch.nn.Module, *, min_elements: int = _MIN_ELEMENTS) -> int:
    """Give the parallel linear layers of ``model`` whose weight has at least ``min_elements``
    a :class:`PackedLinear` kernel (the others ``F.linear``); returns how many."""
    if not packing_available():
        log.info("oneDNN's packed linear is unavailable: linear layers run F.linear")
    return apply_linear_backend(model, functools.partial(onednn_packed, min_elements=min_elements))


def unpack_linears(model: torch.nn.Module) -> None:
    """Back to ``F.linear`` (and drop the packed copies)."""
    for layer in model.modules():
        if isinstance(layer, _LAYERS) and isinstance(layer.kernel, PackedLinear):
            layer.kernel = None
