"""``fully_shard``: the one call that turns a PyTorch module into a sharded data-parallel one.

Apply it bottom-up, to each block you want gathered as a unit and then to the root::

    for block in model.blocks:
        fully_shard(block, mesh=mesh, sharding_strategy="optim_grads_params")
    fully_shard(model, mesh=mesh, sharding_strategy="optim_grads_params")
    optimizer = torch.optim.AdamW(model.parameters())

Afterwards the module's parameters are ``DTensor``s (``Shard(0)`` over the mesh, or
``(Replicate(), Shard(0))`` on a 2-D hybrid mesh; ``Replicate()`` under ``no_shard``) whose local
tensors are this rank's fp32 main-weight shard; after ``backward()`` their ``.grad`` is a
``DTensor`` of the same placement holding this rank's shard of the averaged gradient, so any torch
optimizer steps the shards in place. Forward and backward run on gathered copies in the compute
dtype. The module's class becomes a subclass of :class:`FSDPModule`, which adds the controls below.

Strategies (Megatron-FSDP's names):

=======================  ==========  ===========================  ===========================
strategy                 main+optim  gradients                    compute parameters
=======================  ==========  ===========================  ===========================
``no_shard``             replicated  all-reduced, full            full, persistent
``optim``                sharded     full, reduce-scattered once  full, persistent, refreshed
                                     per accumulation window      by all-gather after a step
``optim_grads``          sharded     reduce-scattered each        full, persistent, refreshed
                                     backward, sharded            by all-gather after a step
``optim_grads_params``   sharded     reduce-scattered each        gathered before forward and
                                     backward, sharded            backward, freed after
=======================  ==========  ===========================  ===========================

Gradients are averaged over every rank of the mesh (``gradient_divide_factor`` overrides: expert
parameters sharded over an expert-data-parallel sub-mesh pass the full data-parallel size, since
each expert already summed the tokens of its expert-parallel peers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megatron_fsdp.bucket import MeshPlan, Strategy
from megatron_fsdp.policies import MixedPrecisionPolicy, OffloadPolicy
from megatron_fsdp.unit import FSDPUnit


class FSDPModule:
    """Mixed into every module passed to :func:`fully_shard`; its methods act on the subtree."""

    _fsdp_unit: FSDPUnit

    def _units(self, recurse: bool = True) -> list[FSDPUnit]:
        modules = self.modules() if recurse else [self]  # type: ignore[attr-defined]
        return [u for m in modules if (u := getattr(m, "_fsdp_unit", None)) is not None]

    def set_requires_gradient_sync(self, requires_gradient_sync: bool, *, recurse: bool = True):
        """Turn gradient reduction on or off for the next backward passes (grad accumulation).

        With it off, ``no_shard`` and ``optim`` only sum local gradients (no communication) until
        a backward with it on; ``optim_grads``/``optim_grads_params`` keep reduce-scattering every
        backward (so no full gradient ever persists) and sum the shards. Either way the gradients
        of all micro-batches add up, as in plain PyTorch.
        """
        for unit in self._units(recurse):
            unit.requires_gradient_sync = requires_gradient_sync

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """``with model.no_sync():`` runs backward passes without gradient sync (DDP-style)."""
        units = self._units()
        before = [u.requires_gradient_sync for u in units]
        for unit in units:
            unit.requires_gradient_sync = False
        try:
            yield
        finally:
            for unit, value in zip(units, before, strict=True):
                unit.requires_gradient_sync = value

    def set_gradient_divide_factor(self, factor: float, *, recurse: bool = True) -> None:
        """Divide gradients by ``factor`` instead of the mesh size before reducing them."""
        if factor <= 0:
            raise ValueError(f"gradient divide factor must be > 0, got {factor}")
        for unit in self._units(recurse):
            unit.gradient_divide_factor = float(factor)

    def unshard(self) -> None:
        """Gather this module's own parameters now, e.g. to call a method other than forward."""
        self._fsdp_unit.unshard()
        self._fsdp_unit._register(unsharded=True)

    def reshard(self) -> None:
        """Put the sharded parameters back and free gathered copies under optim_grads_params.

        Under the other strategies the gathered copy is marked stale instead, so the next
        forward refreshes it: call this after changing parameters in place other than through
        a ``torch.optim`` optimizer's step or a single-tensor in-place op (e.g. with
        ``torch._foreach_*`` kernels).
        """
        for unit in self._units():
            unit._register(unsharded=False)
            unit.reshard()
            unit.invalidate()


_FSDP_CLASSES: dict[type, type] = {}


def _fsdp_class(cls: type) -> type:
    if cls not in _FSDP_CLASSES:
        _FSDP_CLASSES[cls] = type(f"FSDP{cls.__name__}", (FSDPModule, cls), {})
    return _FSDP_CLASSES[cls]


def _device_for(mesh: DeviceMesh) -> torch.device:
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def fully_shard(
    module: nn.Module,
    *,
    mesh: DeviceMesh | None = None,
    sharding_strategy: str = "optim_grads_params",
    mp_policy: MixedPrecisionPolicy | None = None,
    offload_policy: OffloadPolicy | None = None,
    bucket_size_bytes: int | None = None,
    double_buffer: bool = True,
    prefetch: bool = True,
    gradient_divide_factor: float | None = None,
    overlap_grad_reduce: bool = True,
) -> FSDPModule:
    """Shard ``module``'s parameters (those no inner ``fully_shard`` took) over ``mesh``.

    Args:
        module: the module whose forward gathers the parameters; call inner modules first.
        mesh: a 1-D mesh (shard) or 2-D mesh (replicate, shard); default: 1-D over the world.
        sharding_strategy: ``no_shard``, ``optim``, ``optim_grads`` or ``optim_grads_params``.
        mp_policy: compute/reduce dtypes; default computes in the parameters' own dtype.
        offload_policy: keep main weights, gradients and optimizer state on the CPU.
        bucket_size_bytes: split this unit's parameters into buckets of at most this many bytes
            (one collective each, gradients of a bucket reduced as soon as it is complete);
            default one bucket per dtype.
        double_buffer: keep the gather buffers allocated between steps (two in flight with
            prefetch) instead of allocating one per gather.
        prefetch: issue the next unit's gather while this one computes (the order is recorded
            in the first forward).
        gradient_divide_factor: divide gradients by this instead of ``mesh.size()``.
        overlap_grad_reduce: issue each bucket's reduction during backward as soon as its
            gradients are complete; ``False`` issues them all when backward ends (easier to
            profile, no overlap).
    """
    if isinstance(module, FSDPModule):
        raise ValueError(f"fully_shard was already applied to this {type(module).__name__}")
    if type(module).forward is nn.Module.forward:
        # Parameters are gathered around the module's forward; without one they never would be.
        raise ValueError(
            f"fully_shard needs a module whose forward runs, but {type(module).__name__} has no "
            "forward (a container?); apply it to each module inside, or to the module that "
            "calls them"
        )
    strategy = Strategy.from_name(sharding_strategy)
    if gradient_divide_factor is not None and gradient_divide_factor <= 0:
        raise ValueError(f"gradient_divide_factor must be > 0, got {gradient_divide_factor}")
    if mesh is None:
        if not dist.is_initialized():
            raise RuntimeError(
                "fully_shard needs a mesh or an initialised default process group; call "
                "torch.distributed.init_process_group() first or pass mesh=init_device_mesh(...)"
            )
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    unit = FSDPUnit(
        module,
        plan=MeshPlan.build(mesh, shard=strategy.shard_main),
        strategy=strategy,
        device=_device_for(mesh),
        mp_policy=mp_policy or MixedPrecisionPolicy(),
        offload_policy=offload_policy,
        bucket_size_bytes=bucket_size_bytes,
        double_buffer=double_buffer,
        prefetch=prefetch,
        gradient_divide_factor=gradient_divide_factor,
        overlap_grad_reduce=overlap_grad_reduce,
    )
    module._fsdp_unit = unit  # type: ignore[assignment]
    module.__class__ = _fsdp_class(type(module))
    return module  # type: ignore[return-value]
