"""LoRA adapters for mcore's row-parallel linear layers.

:func:`add_lora` freezes a model and gives each target layer (a
:class:`~mcore.parallel.RowParallelLinear`: the attention output projection ``linear_proj``,
the MLP down projection ``linear_fc2``) a child :class:`LoRAAdapter` named ``lora`` and a
forward hook, so the layer computes ``base(x) + (alpha / rank) * B(A(x))``. The layer itself is
untouched: its weights keep their checkpoint keys (``...linear_proj.weight``) and the adapters
add their own (``...linear_proj.lora.A``, ``...linear_proj.lora.B``).

Under tensor parallelism a row-parallel layer's input is split over its features, so ``A``
``[rank, in / tp]`` is split the same way (each rank multiplies its part, and the partial
products are summed over the TP group, as the base layer's are), and ``B`` ``[out, rank]`` is
replicated. With sequence parallelism the sum is a reduce-scatter along the sequence, like the
base layer's, and ``B``'s gradient (each rank's covers its sequence chunk) is summed over TP.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mcore.core import McoreError
from mcore.parallel import (
    RowParallelLinear,
    init_method_normal,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
)
from mcore.parallel.init import ZEROS, init_tensor
from mcore.parallel.sharding import Layout

__all__ = ["LoRAAdapter", "adapters_of", "add_lora", "b_norm"]


class LoRAAdapter(nn.Module):
    """``(alpha / rank) * B(A(x))`` for the input of row-parallel layer ``base``.

    ``A`` ``[rank, in / tp]`` starts from ``N(0, 1 / in)`` (``in``: the full input features),
    ``B`` ``[out, rank]`` from zeros, so an adapted model starts as the model was. Built on the
    ``meta`` device the tensors only record their recipes (:func:`mcore.parallel.init.
    set_init`) for the runtime to fill; built on a real device they are filled at once.
    """

    def __init__(self, base: RowParallelLinear, *, rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.tp_group, self.tp_size, self.tp_rank = base.tp_group, base.tp_size, base.tp_rank
        self.sequence_parallel = base.sequence_parallel
        self.input_is_parallel = base.input_is_parallel
        self.in_features, self.out_features = base.in_features, base.out_features
        weight = base.weight
        kwargs = {"dtype": weight.dtype, "device": weight.device}
        self.A = nn.Parameter(torch.empty(rank, base.input_size_per_partition, **kwargs))
        self.B = nn.Parameter(torch.empty(base.out_features, rank, **kwargs))
        # Counted once in the gradient norm: A's TP shards each, B (replicated) on TP rank 0.
        self.A.tensor_model_parallel = self.tp_size > 1
        self.B.tensor_model_parallel = False
        if self.sequence_parallel and self.tp_size > 1:
            self.B.reduce_grad_over_tp = True
        init_tensor(self.A, init_method_normal(1.0 / math.sqrt(self.in_features)), self._a_layout())
        init_tensor(self.B, ZEROS)

    def _a_layout(self) -> Layout:
        return Layout.split(tuple(self.A.shape), {1: (self.tp_rank, self.tp_size, None)})

    def shard_layout(self, name: str) -> Layout | None:
        """``A``'s columns are this rank's share of the input features; ``B`` is replicated."""
        return self._a_layout() if name == "A" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: the base layer's input (``[..., in / tp]``) -> ``[..., out]`` (sequence chunk
        ``[s / tp, b, out]`` with sequence parallelism), what the base layer outputs."""
        if not self.input_is_parallel:
            x = scatter_to_tensor_parallel_region(x, self.tp_group)
        z = F.linear(x, self.A)
        if self.sequence_parallel:
            z = reduce_scatter_to_sequence_parallel_region(z, self.tp_group)
        else:
            z = reduce_from_tensor_parallel_region(z, self.tp_group)
        return F.linear(z, self.B) * self.scale

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, alpha={self.alpha}, in_features={self.in_features}, "
            f"out_features={self.out_features}, tp={self.tp_rank}/{self.tp_size}"
        )


def _add_update(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    """The forward hook of an adapted layer: its output plus its adapter's update."""
    return output + module.lora(args[0])


def add_lora(
    chunks: Sequence[nn.Module], *, rank: int, alpha: float, targets: Iterable[str]
) -> list[LoRAAdapter]:
    """Freeze every parameter of ``chunks`` and adapt each :class:`RowParallelLinear` whose
    attribute name is in ``targets``; returns the adapters (the only trainable parameters)."""
    targets = set(targets)
    found = [
        module
        for chunk in chunks
        for name, module in chunk.named_modules()
        if isinstance(module, RowParallelLinear) and name.rsplit(".", 1)[-1] in targets
    ]
    if not found:
        raise McoreError(
            f"lora.rank is {rank}, but the model has no layer named in lora.targets "
            f"({sorted(targets)}): nothing to adapt"
        )
    for chunk in chunks:
        for p in chunk.parameters():
            p.requires_grad_(False)
    adapters = []
    for layer in found:
        if hasattr(layer, "lora"):
            raise McoreError(f"{type(layer).__name__} already has an adapter (lora added twice)")
        layer.lora = LoRAAdapter(layer, rank=rank, alpha=alpha)  # trainable: a new module
        layer.register_forward_hook(_add_update)
        adapters.append(layer.lora)
    return adapters


def adapters_of(chunks: Iterable[nn.Module]) -> list[LoRAAdapter]:
    """Every :class:`LoRAAdapter` in ``chunks`` (wrapped or not)."""
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, LoRAAdapter)]


@torch.no_grad()
def b_norm(adapters: Sequence[LoRAAdapter], parallel_state: Any, device: torch.device) -> float:
    """The global L2 norm of every ``B`` of the model. ``B`` is replicated over tensor- and
    data-parallel ranks, and pipeline stages hold different layers: one sum over the stages.
    Call it on every rank alike when ``pp_size > 1`` (a collective)."""
    total = torch.zeros((), dtype=torch.float32, device=device)
    for adapter in adapters:
        total += adapter.B.detach().float().square().sum().to(device)
    if getattr(parallel_state, "pp_size", 1) > 1 and dist.is_initialized():
        dist.all_reduce(total, group=parallel_state.pp_group)
    return float(total.sqrt())
