"""The global gradient norm over every parallel group, and clipping by it.

Each element of the model's gradient must be counted exactly once over the world:

- a TP-sharded parameter (a ``ColumnParallelLinear`` weight) differs between TP ranks: each
  counts its shard;
- a replicated parameter (a norm weight, a ``RowParallelLinear`` bias) has the same gradient on
  every TP rank once partial gradients are reduced: only TP rank 0 counts it;
- pipeline stages hold different layers: each counts its own, except the tied word-embedding
  copies (``shared_embedding``) that the first and last stage both hold: the first counts it;
- data-parallel replicas hold the same reduced gradients and count nothing twice, except under
  the distributed optimizer, where each holds a disjoint shard and counts that.

So each rank sums the squares of what it counts and the sum is all-reduced over the groups that
split the gradient (tp, pp, and dp_cp for the distributed optimizer's shards).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn


def tp_sharded_params(module: nn.Module) -> set[int]:
    """Ids of ``module``'s parameters that are split over tensor-parallel ranks.

    A parameter may say so itself through Megatron's ``param.tensor_model_parallel`` attribute.
    Otherwise mcore's tensor-parallel layers are recognised by what they carry (``tp_size`` and
    ``full_weight_shape``): the weight is sharded when its local shape differs from the full
    one, the bias when it is shorter than ``out_features`` (a column-parallel bias; a
    row-parallel bias is replicated).
    """
    sharded: set[int] = set()
    for layer in module.modules():
        tp_size = getattr(layer, "tp_size", 1)
        full_shape = getattr(layer, "full_weight_shape", None)
        for name, p in layer.named_parameters(recurse=False):
            flag = getattr(p, "tensor_model_parallel", None)
            if flag is None and tp_size > 1 and full_shape is not None:
                if name == "weight":
                    flag = tuple(p.shape) != tuple(full_shape)
                elif name == "bias":
                    flag = p.numel() != getattr(layer, "out_features", p.numel())
            if flag:
                sharded.add(id(p))
    return sharded


def _comm_device(groups: Sequence[dist.ProcessGroup], fallback: torch.device) -> torch.device:
    """Where a tensor must live to be reduced over ``groups``: CUDA for NCCL, else CPU."""
    if any("nccl" in str(dist.get_backend(g)) for g in groups):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if groups else fallback


def global_grad_norm(
    grads: Sequence[torch.Tensor], groups: Iterable[dist.ProcessGroup | None]
) -> torch.Tensor:
    """The L2 norm of the gradient that ``grads`` (this rank's counted part) belongs to, summed
    over ``groups`` (``None`` and single-rank groups are skipped). Returns a float64 scalar,
    identical on every rank of the groups; inf or nan when any gradient is not finite.
    """
    groups = [g for g in groups if g is not None and dist.get_world_size(g) > 1]
    fallback = grads[0].device if grads else torch.device("cpu")
    device = _comm_device(groups, fallback)
    if grads:
        # float64 for the sum of squares: many large fp32 norms must not overflow to inf.
        squares = torch.nn.utils.get_total_norm(grads, 2.0).to(device, torch.float64) ** 2
    else:
        squares = torch.zeros((), dtype=torch.float64, device=device)
    for group in groups:
        dist.all_reduce(squares, group=group)
    return squares.sqrt()


def scale_grads_(grads: Sequence[torch.Tensor], factor: float) -> None:
    """Multiply ``grads`` in place by ``factor``, one fused kernel per device and dtype."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        by_kind.setdefault((g.device, g.dtype), []).append(g)
    for same in by_kind.values():
        torch._foreach_mul_(same, factor)


def clip_grads_(grads: Sequence[torch.Tensor], max_norm: float, total_norm: float) -> float:
    """Scale ``grads`` so that their global norm ``total_norm`` is at most ``max_norm``, with
    ``torch.nn.utils.clip_grad_norm_``'s coefficient. Returns the coefficient used (<= 1)."""
    coefficient = max_norm / (total_norm + 1e-6)
    if coefficient < 1.0:
        scale_grads_(grads, coefficient)
        return coefficient
    return 1.0
