"""The ``megatron_fsdp`` data-parallel wrapper for mcore models.

How an mcore model is sharded (outermost last, as ``fully_shard`` wants it):

1. the experts of every MoE layer (the outermost modules all of whose parameters are marked
   ``expert_parallel``) over the expert-data-parallel group ``edp``, their gradients divided by
   the dense data-parallel size (each expert already summed the tokens its expert-parallel
   peers sent it, exactly as mcore's DDP reduces them);
2. every transformer layer (the model's ``layers``) over the ``dp_cp`` group;
3. the model itself (embedding, final norm, output layer), the root that drives prefetching.

With ``fsdp.num_distributed_optimizer_instances = R > 1`` each mesh is 2-D: ``R`` replicas,
each sharding over ``dp_cp / R`` (``edp / R``) consecutive ranks (hybrid sharding).

The wrapper speaks the protocol mcore's runtime and optimizers expect of a data-parallel
wrapper: the model is ``.module``, ``no_sync()`` for gradient accumulation,
``finish_grad_sync()`` after the last backward. Parameters are ``DTensor``s whose local pieces
are fp32 main weights, so ``mcore.parallel``'s optimizers step them in place; mixed precision
(``train.bf16`` / ``train.fp16``) computes on gathered low-precision copies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from mcore.core import McoreError
from mcore.parallel import ParallelState, is_expert_parallel
from mcore.parallel.distributed import broadcast_params, compute_dtype
from mcore.parallel.init import has_meta_tensors
from megatron_fsdp.api import FSDPModule, fully_shard
from megatron_fsdp.mcore_adapter import FSDPConfig
from megatron_fsdp.policies import MixedPrecisionPolicy


class MegatronFSDP(nn.Module):
    """An mcore model (or a ``ModuleList`` of virtual-pipeline chunks) under ``fully_shard``."""

    def __init__(
        self, module: nn.Module, parallel_state: ParallelState, config: FSDPConfig, **shard: Any
    ) -> None:
        super().__init__()
        self.module = module
        self.parallel_state = parallel_state
        ps = parallel_state
        instances = config.num_distributed_optimizer_instances
        dense_mesh = _mesh(ps, "dp_cp", instances)
        expert_mesh = _mesh(ps, "edp", instances) if _has_experts(module) else None
        options: dict[str, Any] = dict(
            sharding_strategy=config.data_parallel_sharding_strategy,
            prefetch=config.overlap_param_gather,
            double_buffer=config.fsdp_double_buffer,
            overlap_grad_reduce=config.overlap_grad_reduce,
            **shard,
        )
        self._roots: list[FSDPModule] = []
        for root in module if isinstance(module, nn.ModuleList) else [module]:
            for layer in _layers(root):
                for experts in _expert_modules(layer):
                    fully_shard(
                        experts,
                        mesh=expert_mesh,
                        gradient_divide_factor=ps.dp_cp_size,
                        **options,
                    )
                fully_shard(layer, mesh=dense_mesh, **options)
            self._roots.append(fully_shard(root, mesh=dense_mesh, **options))
        self._tp_partial = [p for p in self.parameters() if getattr(p, "reduce_grad_over_tp", 0)]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    # The wrapper adds no state: checkpoints hold the module's own keys (DTensor shards).
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.module.load_state_dict(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients of the backward passes inside (all micro-batches but the last).

        ``no_shard``/``optim`` then skip communication; the other strategies still
        reduce-scatter every backward, so no full gradient persists.
        """
        with contextlib.ExitStack() as stack:
            for root in self._roots:
                stack.enter_context(root.no_sync())
            yield

    def finish_grad_sync(self) -> None:
        """Complete the gradients after the step's last backward: sum over TP the pieces of
        replicated parameters each TP rank only partly computed (``reduce_grad_over_tp``).

        The data-parallel reductions themselves finish when each backward ends. Call once per
        step, as mcore's runtime does.
        """
        ps = self.parallel_state
        if ps.tp_size == 1:
            return
        grads = [_local(p.grad) for p in self._tp_partial if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=ps.tp_group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.parameters():
            p.grad = None


def wrap_megatron_fsdp(
    model: nn.Module, parallel_state: ParallelState, config: Any
) -> MegatronFSDP:
    """The ``data_parallel`` registry's ``megatron_fsdp`` entry.

    Reads the ``[fsdp]`` section; ``train.bf16`` / ``train.fp16`` pick the compute dtype, while
    the shards (main weights, gradients, optimizer state) stay in the model's fp32.
    """
    fsdp = config.fsdp if "fsdp" in config else FSDPConfig()
    if "optimizer" in config and config.optimizer.use_distributed_optimizer:
        raise McoreError(
            "optimizer.use_distributed_optimizer: megatron_fsdp already shards the optimizer "
            "state; set it to false"
        )
    dtype = compute_dtype(config)
    policy = MixedPrecisionPolicy(
        param_dtype=dtype,
        reduce_dtype=torch.float32 if dtype is not None and fsdp.grad_reduce_in_fp32 else None,
    )
    if has_meta_tensors(model):
        # Built on meta: each rank's shards are filled afterwards from the same seeded,
        # layout-free draws (mcore.parallel.init), so the replicas start equal by construction.
        return MegatronFSDP(model, parallel_state, fsdp, mp_policy=policy)
    # Replicas must start equal; each then keeps only its shard of rank 0's weights.
    broadcast_params(model, parallel_state)
    return MegatronFSDP(model, parallel_state, fsdp, mp_policy=policy)


# mcore train hands this wrapper the model still on the meta device and materialises the shards
# it creates, so no rank allocates a full copy of any parameter.
wrap_megatron_fsdp.accepts_meta_model = True  # pyright: ignore[reportFunctionMemberAccess]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _layers(root: nn.Module) -> list[nn.Module]:
    """The transformer layers of an mcore model: its ``layers`` dict (or list)."""
    layers = getattr(root, "layers", None)
    if isinstance(layers, nn.ModuleDict):
        return list(layers.values())
    if isinstance(layers, nn.ModuleList):
        return list(layers)
    return []


def _has_experts(module: nn.Module) -> bool:
    """Whether any rank's model holds experts (a pipeline stage may hold none while others
    do; building the expert mesh is collective, so every rank must agree)."""
    local = any(is_expert_parallel(p) for p in module.parameters())
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    device = "cuda" if "nccl" in str(dist.get_backend()) else "cpu"
    flag = torch.tensor([float(local)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _expert_modules(layer: nn.Module) -> list[nn.Module]:
    """The outermost submodules of ``layer`` whose parameters are all expert-parallel."""
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        params = list(module.parameters())
        if params and all(is_expert_parallel(p) for p in params):
            if type(module).forward is nn.Module.forward:
                raise McoreError(
                    f"megatron_fsdp shards experts around their forward, but the expert module "
                    f"{type(module).__name__} has none; put the expert weights in a module "
                    "whose forward uses them"
                )
            found.append(module)
            return
        for child in module.children():
            visit(child)

    for child in layer.children():
        visit(child)
    return found


def _mesh(ps: ParallelState, dim: str, instances: int) -> DeviceMesh:
    """The mesh parameters shard over: this rank's ``dp_cp`` (or ``edp``) group, 1-D, or
    2-D ``(replicate, shard)`` over ``instances`` replicas."""
    size = getattr(ps, f"{dim}_size")
    group = getattr(ps, f"{dim}_group")
    if ps.mesh is None:
        raise McoreError(
            "train.data_parallel = 'megatron_fsdp' shards over torch.distributed ranks, and this "
            "run has none: launch it with mcore train --nproc N (or torchrun), or use 'ddp'"
        )
    device_type = ps.mesh.device_type
    if size % instances:
        raise McoreError(
            f"fsdp.num_distributed_optimizer_instances ({instances}) must divide the "
            f"{'data' if dim == 'dp_cp' else 'expert-data'}-parallel size ({size})"
        )
    if instances == 1:
        return DeviceMesh.from_group(group, device_type)
    # Every group of this kind over the world, each laid out [replicas, shard], so that the
    # shard and replicate sub-groups can be built collectively (same order on every rank).
    every = _all_groups(ps, dim)
    shard_size = size // instances
    shard_members = [
        g[r * shard_size : (r + 1) * shard_size] for g in every for r in range(instances)
    ]
    replicate_members = [g[s::shard_size] for g in every for s in range(shard_size)]
    shard_group, _ = dist.new_subgroups_by_enumeration(shard_members, group_desc=f"{dim}_shard")
    replicate_group, _ = dist.new_subgroups_by_enumeration(
        replicate_members, group_desc=f"{dim}_replicate"
    )
    (mine,) = [g for g in every if ps.rank in g]
    layout = torch.tensor(mine).view(instances, shard_size)
    return DeviceMesh.from_group(
        [cast(dist.ProcessGroup, replicate_group), cast(dist.ProcessGroup, shard_group)],
        device_type,
        mesh=layout,
        mesh_dim_names=("replicate", "shard"),
    )


def _all_groups(ps: ParallelState, dim: str) -> list[list[int]]:
    """The global ranks of every ``dp_cp`` or ``edp`` group, each in group-rank order."""
    assert ps.mesh is not None and ps.expert_mesh is not None  # a distributed layout
    if dim == "dp_cp":
        ranks = ps.mesh.mesh  # [pp, dp, cp, tp]
        pp, dp, cp, tp = ranks.shape
        return ranks.permute(0, 3, 1, 2).reshape(pp * tp, dp * cp).tolist()
    ranks = ps.expert_mesh.mesh  # [pp, edp, ep, etp]
    pp, edp, ep, etp = ranks.shape
    return ranks.permute(0, 2, 3, 1).reshape(pp * ep * etp, edp).tolist()


if TYPE_CHECKING:
    # The registry entry conforms: the type checker verifies this assignment.
    from mcore.parallel.protocols import DataParallelBuilder

    _BUILDER: DataParallelBuilder = wrap_megatron_fsdp
