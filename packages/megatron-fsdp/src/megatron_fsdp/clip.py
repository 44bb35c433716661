"""Gradient norm and clipping over ``DTensor`` gradients that may live on different meshes.

``torch.nn.utils.clip_grad_norm_`` combines per-parameter norms with DTensor ops, which needs
every gradient on one mesh. Here each rank sums the ``p``-th powers of its *local* shards,
dividing each by how many ranks hold an identical copy of it (the sizes of its ``Replicate``
mesh dims), and one all-reduce over the whole group adds them up. That counts every distinct
gradient element exactly once, whatever mesh it is sharded on: dense parameters over the full
data-parallel mesh, expert parameters over an expert-data-parallel sub-mesh (each expert-parallel
rank holding different experts), hybrid ``(Replicate(), Shard(0))`` parameters, plain tensors
(treated as replicated on every rank of the group).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


def _grads(parameters: nn.Module | Iterable[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    if isinstance(parameters, nn.Module):
        parameters = parameters.parameters()
    elif isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    return [p.grad for p in parameters if p.grad is not None]


def _reduce_device(group: dist.ProcessGroup | None) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def total_grad_norm(
    parameters: nn.Module | Iterable[torch.Tensor] | torch.Tensor,
    norm_type: float = 2.0,
    *,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """The norm of all gradients of ``parameters`` across ``group`` (default: every rank)."""
    norm_type = float(norm_type)
    device = _reduce_device(group)
    group_size = dist.get_world_size(group)
    acc = torch.zeros((), dtype=torch.float64, device=device)
    for grad in _grads(parameters):
        if isinstance(grad, DTensor):
            local = grad.to_local()
            copies = math.prod(
                grad.device_mesh.size(d)
                for d, pl in enumerate(grad.placements)
                if pl.is_replicate()
            )
        else:
            local, copies = grad, group_size
        if local.numel() == 0:
            continue
        local = local.detach().to(device, torch.float64)
        if math.isinf(norm_type):
            acc = torch.maximum(acc, local.abs().max())
        else:
            acc += local.abs().pow(norm_type).sum() / copies
    if math.isinf(norm_type):
        dist.all_reduce(acc, op=dist.ReduceOp.MAX, group=group)
        return acc.float()
    dist.all_reduce(acc, group=group)
    return acc.pow(1.0 / norm_type).float()


def clip_grad_norm_(
    parameters: nn.Module | Iterable[torch.Tensor] | torch.Tensor,
    max_norm: float,
    norm_type: float = 2.0,
    *,
    group: dist.ProcessGroup | None = None,
    error_if_nonfinite: bool = False,
) -> torch.Tensor:
    """Scale gradients in place so their global norm is at most ``max_norm``; returns the norm.

    Works like ``torch.nn.utils.clip_grad_norm_`` but across gradients sharded on different
    meshes; ``group`` must contain every rank that holds any of them (default: the world).
    """
    if isinstance(parameters, nn.Module):
        parameters = list(parameters.parameters())
    elif isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    else:
        parameters = list(parameters)
    total = total_grad_norm(parameters, norm_type, group=group)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(
            f"the total norm of order {norm_type} of the gradients is {total.item()}; "
            "pass error_if_nonfinite=False to clip anyway"
        )
    coef = (float(max_norm) / (total + 1e-6)).clamp(max=1.0)
    with torch.no_grad():
        for grad in _grads(parameters):
            local = grad.to_local() if isinstance(grad, DTensor) else grad
            local.mul_(coef.to(local.device, local.dtype))
    return total
