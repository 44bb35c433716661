"""One bucket: a flat group of parameters with one collective per gather and per reduction.

A bucket owns four flat buffers (see :mod:`megatron_fsdp.layout` for their layouts):

``main``
    This rank's shard of the parameters in their own dtype (fp32 main weights under mixed
    precision), on the device or, with an :class:`~megatron_fsdp.OffloadPolicy`, on the CPU.
    The ``DTensor`` parameters that the user's optimizer sees are views of it, so
    ``optimizer.step()`` updates it in place.
``main_grad``
    This rank's shard of the reduced gradients, same dtype and place as ``main``. The
    ``DTensor`` gradients (``param.grad``) are views of it. It lives from the first reduction
    of a step until the forward after ``optimizer.zero_grad()`` (set_to_none) cleared them.
``unsharded``
    The gathered parameters in the compute dtype, parameter-major; modules run on views of it.
    Under ``optim_grads_params`` its storage is freed between uses. When nothing is sharded and
    no cast is needed it *is* ``main``.
``grad_acc``
    Full-size, rank-major gradients in the reduce dtype, summed over micro-batches until the
    reduction. Persistent for ``no_shard``/``optim`` (their gradients are not sharded);
    allocated per backward for ``optim_grads``/``optim_grads_params``.

A gathered copy that is kept (``no_shard`` with a cast, ``optim``, ``optim_grads``) must be
refreshed after the weights change. Two signals mark it stale: a global
``torch.optim`` step post-hook (any optimizer that steps one of our parameters: foreach and fused
kernels bump no version counter that could tell us), and the parameters' version counters, which
single-tensor in-place writes (``load_state_dict``, ``p.copy_``) bump. The refresh itself is the
next forward's gather, so it overlaps compute like any prefetch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard
from torch.optim.optimizer import register_optimizer_step_post_hook

from megatron_fsdp import SHARDING_STRATEGIES
from megatron_fsdp.layout import FlatLayout


@dataclass(frozen=True)
class Strategy:
    """What a sharding strategy name means for the buffers."""

    name: str
    shard_main: bool
    """Main weights, gradients and optimizer state are sharded (all but ``no_shard``)."""
    keep_full_grads: bool
    """Gradients stay full-size and are reduced once per accumulation window
    (``no_shard``, ``optim``)."""
    reshard_params: bool
    """Gathered parameters are freed after forward and after backward (``optim_grads_params``)."""

    @classmethod
    def from_name(cls, name: str) -> Strategy:
        flags = {
            "no_shard": (False, True, False),
            "optim": (True, True, False),
            "optim_grads": (True, False, False),
            "optim_grads_params": (True, False, True),
        }
        if name not in flags:
            known = ", ".join(map(repr, SHARDING_STRATEGIES))
            raise ValueError(f"sharding_strategy must be one of {known}, got {name!r}")
        return cls(name, *flags[name])


@dataclass(frozen=True)
class MeshPlan:
    """The process groups and DTensor placements that one mesh implies for a strategy.

    A 1-D mesh shards over its only dim. A 2-D mesh is hybrid sharding: dim 0 replicates,
    dim 1 shards, so parameters are ``(Replicate(), Shard(0))``.
    """

    mesh: DeviceMesh
    placements: tuple[Placement, ...]
    shard_group: dist.ProcessGroup | None
    shard_world: int
    shard_rank: int
    replicate_groups: tuple[dist.ProcessGroup, ...]
    """All-reduced over after the reduce-scatter (every mesh dim when nothing is sharded)."""

    @classmethod
    def build(cls, mesh: DeviceMesh, shard: bool) -> MeshPlan:
        if mesh.ndim not in (1, 2):
            raise ValueError(
                f"fully_shard takes a 1-D mesh (shard) or a 2-D mesh (replicate, shard); "
                f"got a {mesh.ndim}-D mesh of shape {tuple(mesh.shape)}"
            )
        groups = [mesh.get_group(d) for d in range(mesh.ndim)]
        if not shard:
            return cls(mesh, (Replicate(),) * mesh.ndim, None, 1, 0, tuple(groups))
        last = mesh.ndim - 1
        placements = (Replicate(),) * last + (Shard(0),)
        return cls(
            mesh, placements, groups[last], mesh.size(last), mesh.get_local_rank(last),
            tuple(groups[:last]),
        )  # fmt: skip


class BufferPool:
    """Persistent gather buffers handed out by size: the double buffers of prefetching.

    A gather takes a buffer and returns it once its parameters are copied out. Prefetching
    keeps at most the current and the next bucket in flight, so in steady state a run of
    same-sized units (transformer layers) cycles through two buffers that are allocated once.
    With ``persistent=False`` every gather allocates and frees its own buffer instead.
    """

    def __init__(self, persistent: bool = True) -> None:
        self.persistent = persistent
        self._free: dict[tuple[int, torch.dtype, torch.device], list[torch.Tensor]] = {}
        self._all: list[torch.Tensor] = []

    def get(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        free = self._free.get((numel, dtype, device))
        if free:
            return free.pop()
        buf = torch.empty(numel, dtype=dtype, device=device)
        if self.persistent:
            self._all.append(buf)
        return buf

    def put(self, buf: torch.Tensor) -> None:
        if self.persistent:
            self._free.setdefault((buf.numel(), buf.dtype, buf.device), []).append(buf)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._all)


_BUCKET_ATTR = "_megatron_fsdp_bucket"
_hook_installed = False


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            bucket = getattr(p, _BUCKET_ATTR, None)
            if bucket is not None:
                bucket.invalidate()


def install_optimizer_hook() -> None:
    """Mark gathered copies stale whenever any torch optimizer steps their parameters."""
    global _hook_installed
    if not _hook_installed:
        register_optimizer_step_post_hook(_after_optimizer_step)
        _hook_installed = True


INIT_PENDING = "init_pending"
"""Set on a sharded parameter (and buffer) made from a ``meta`` one: its shard is allocated
(zeros) but holds no values yet; whoever built the model on meta fills the local shards
(``param.to_local()``) and clears the flag."""


def _copy_attributes(sources: Sequence[nn.Parameter], targets: Sequence[nn.Parameter]) -> None:
    # Frameworks tag parameters with plain attributes (Megatron's ``tensor_model_parallel``,
    # ``expert_parallel``, ``shared_embedding``, ...); the sharded and gathered parameters
    # replace the originals, so they carry the tags on.
    for src, dst in zip(sources, targets, strict=True):
        for name, value in vars(src).items():
            if not name.startswith("_"):
                setattr(dst, name, value)


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= max(size, 1)
    return tuple(reversed(stride))


def _storage_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().size()


class Bucket:
    """The flat buffers and collectives of one group of same-dtype parameters."""

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        *,
        plan: MeshPlan,
        strategy: Strategy,
        device: torch.device,
        param_dtype: torch.dtype | None,
        reduce_dtype: torch.dtype | None,
        offload_pin_memory: bool | None,
    ) -> None:
        self.plan = plan
        self.strategy = strategy
        self.device = device
        self.layout = FlatLayout.build([p.shape for p in params], plan.shard_world)
        self.main_dtype = params[0].dtype
        self.compute_dtype = param_dtype or self.main_dtype
        self.reduce_dtype = reduce_dtype or self.compute_dtype
        self.offloaded = offload_pin_memory is not None
        main_device = torch.device("cpu") if self.offloaded else device
        pin = bool(offload_pin_memory) and torch.cuda.is_available()
        self._main_alloc: dict[str, Any] = dict(
            dtype=self.main_dtype, device=main_device, pin_memory=pin
        )

        world, rank = plan.shard_world, plan.shard_rank
        self.main = torch.zeros(self.layout.shard_numel, **self._main_alloc)
        for i, p in enumerate(params):
            if not p.is_meta:  # a meta parameter has no values: its shard is filled later
                self.layout.copy_shard_from_full(self.main, i, p, rank)
        self.requires_grad = [p.requires_grad for p in params]

        with torch.no_grad():
            self.sharded_params = [
                nn.Parameter(self._dtensor(self.main, i), requires_grad=p.requires_grad)
                for i, p in enumerate(params)
            ]
        for p in self.sharded_params:
            setattr(p, _BUCKET_ATTR, self)
        _copy_attributes(params, self.sharded_params)
        for p, sharded in zip(params, self.sharded_params, strict=True):
            if p.is_meta:
                setattr(sharded, INIT_PENDING, True)
        # Nothing to gather and nothing to cast: compute directly on the main weights.
        self.aliased = world == 1 and self.compute_dtype == self.main_dtype and not self.offloaded
        if self.aliased:
            self.unsharded = self.main
        else:
            self.unsharded = torch.empty(
                self.layout.unsharded_numel, dtype=self.compute_dtype, device=device
            )
        self.unsharded_params = [
            nn.Parameter(self.layout.unsharded_view(self.unsharded, i), requires_grad=rg)
            for i, rg in enumerate(self.requires_grad)
        ]
        _copy_attributes(params, self.unsharded_params)
        if not self.aliased:
            self.unsharded.untyped_storage().resize_(0)
        self._gathered_signature: int | None = None
        self._pending_gather: tuple | None = None

        self.main_grad: torch.Tensor | None = None
        self._grad_dtensors: list[DTensor | None] = []
        self.grad_acc: torch.Tensor | None = None
        self._num_trainable = sum(self.requires_grad)
        self._folded: set[int] = set()
        self._reduced = False
        self._pending_reduce: tuple | None = None

    # -- parameters --------------------------------------------------------------------------

    def _dtensor(self, shard: torch.Tensor, index: int) -> DTensor:
        slot = self.layout.slots[index]
        local = self.layout.local_view(shard, index, self.plan.shard_rank)
        return DTensor.from_local(
            local, self.plan.mesh, self.plan.placements, run_check=False,
            shape=slot.shape, stride=_contiguous_stride(slot.shape),
        )  # fmt: skip

    def _signature(self) -> int:
        # Versions only grow, so their sum changes whenever any of them does. An optimizer's
        # in-place update bumps the DTensor's counter, a write through to_local() the local's.
        total = self.main._version
        for p in self.sharded_params:
            total += p._version + p._local_tensor._version  # pyright: ignore[reportAttributeAccessIssue]
        return total

    @property
    def is_unsharded(self) -> bool:
        """The gathered copy is allocated and matches the current main weights."""
        return self.aliased or self._gathered_signature == self._signature()

    def start_gather(self, pool: BufferPool) -> None:
        """Issue the (asynchronous) all-gather of this bucket unless its copy is current."""
        if self._pending_gather is not None or self.is_unsharded:
            return
        signature = self._signature()
        src = self.main
        if src.device != self.device or src.dtype != self.compute_dtype:
            src = src.to(device=self.device, dtype=self.compute_dtype, non_blocking=True)
        if self.plan.shard_world == 1:
            self._pending_gather = (None, None, src, signature)
            return
        out = pool.get(self.layout.unsharded_numel, self.compute_dtype, self.device)
        work = dist.all_gather_into_tensor(out, src, group=self.plan.shard_group, async_op=True)
        self._pending_gather = (work, out, src, signature)

    def finish_gather(self, pool: BufferPool) -> None:
        """Wait for the gather and lay the parameters out for compute."""
        if self._pending_gather is None:
            if self.is_unsharded:
                return
            self.start_gather(pool)
        pending = self._pending_gather
        assert pending is not None, "start_gather issued it"
        work, out, src, signature = pending
        self._pending_gather = None
        if work is not None:
            work.wait()
        storage = self.unsharded.untyped_storage()
        nbytes = self.unsharded.numel() * self.unsharded.element_size()
        if storage.size() != nbytes:
            storage.resize_(nbytes)
        # Autograd may hold these parameters from a forward whose backward has yet to run (the
        # re-gather before backward): the values are identical, so keep the version it saw.
        with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(self.unsharded):
            if out is None:
                self.unsharded.copy_(src)
            else:
                self.layout.copy_out(out, self.unsharded)
                pool.put(out)
        self._gathered_signature = signature

    def invalidate(self) -> None:
        """The main weights changed: the next gather must refresh the gathered copy."""
        self._gathered_signature = None

    def free_unsharded(self) -> None:
        """Release the gathered copy (its storage, so views and autograd keep their metadata)."""
        if self.aliased:
            return
        if self._pending_gather is not None:  # a prefetch nobody used: finish it to free it
            work = self._pending_gather[0]
            if work is not None:
                work.wait()
            self._pending_gather = None
        storage = self.unsharded.untyped_storage()
        if storage.size():
            storage.resize_(0)
        self._gathered_signature = None

    # -- gradients ---------------------------------------------------------------------------

    def fold_grad(self, index: int, grad: torch.Tensor, scale: float) -> None:
        """Add one parameter's full local gradient (times ``scale``) into the accumulator."""
        if self.grad_acc is None:
            self.grad_acc = torch.zeros(
                self.layout.unsharded_numel, dtype=self.reduce_dtype, device=self.device
            )
        self.layout.add_full_grad(self.grad_acc, index, grad, scale)
        self._folded.add(index)

    @property
    def all_grads_folded(self) -> bool:
        return self._num_trainable > 0 and len(self._folded) == self._num_trainable

    def end_backward(self) -> None:
        """Forget which gradients arrived in this backward (they stay in the accumulator)."""
        self._folded.clear()
        self._reduced = False

    @property
    def trainable(self) -> bool:
        return self._num_trainable > 0

    def start_reduce(self) -> None:
        """Issue the reduce-scatter (or all-reduce) of the accumulated gradients (zeros when
        none arrived on this rank: every rank of the mesh must take part)."""
        if self.grad_acc is None:
            self.grad_acc = torch.zeros(
                self.layout.unsharded_numel, dtype=self.reduce_dtype, device=self.device
            )
        acc = self.grad_acc
        self._folded.clear()
        self._reduced = True
        if self.plan.shard_world > 1:
            out = torch.empty(self.layout.shard_numel, dtype=self.reduce_dtype, device=self.device)
            work = dist.reduce_scatter_tensor(out, acc, group=self.plan.shard_group, async_op=True)
            rest = self.plan.replicate_groups
        else:
            out, groups = acc, self.plan.replicate_groups
            work = dist.all_reduce(out, group=groups[0], async_op=True) if groups else None
            rest = groups[1:]
        self._pending_reduce = (work, acc, out, rest)

    @property
    def reduced_this_backward(self) -> bool:
        """Its gradients of the running backward were handed to a reduction already."""
        return self._reduced

    def finish_reduce(self) -> None:
        """Wait for the reduction and add the gradient shard into ``param.grad``."""
        assert self._pending_reduce is not None, "finish_reduce follows a start_reduce"
        work, acc, out, rest = self._pending_reduce
        self._pending_reduce = None
        if work is not None:
            work.wait()
        for group in rest:  # hybrid sharding: the shard is then averaged across replicas
            dist.all_reduce(out, group=group)
        self._add_to_main_grad(out)
        if self.strategy.keep_full_grads:
            acc.zero_()
        else:
            self.grad_acc = None

    def release_cleared_grads(self) -> None:
        """Free the gradient shard once the user cleared every ``.grad`` (``zero_grad()``).

        Called before forward, so between ``zero_grad()`` and the next backward the gradients
        take no memory, as in plain PyTorch.
        """
        if self.main_grad is not None and all(p.grad is None for p in self.sharded_params):
            self.main_grad = None
            self._grad_dtensors = []

    def _add_to_main_grad(self, reduced: torch.Tensor) -> None:
        if self.main_grad is None:
            self.main_grad = torch.zeros(self.layout.shard_numel, **self._main_alloc)
            with torch.no_grad():
                self._grad_dtensors = [
                    self._dtensor(self.main_grad, i) if rg else None
                    for i, rg in enumerate(self.requires_grad)
                ]
        rank = self.plan.shard_rank
        current = [p.grad for p in self.sharded_params]
        reduced = reduced.to(self.main_grad.device, self.main_grad.dtype)
        # Gradients sum across backward passes until the user clears them, as in plain PyTorch:
        # add onto ours, start from zero where they were set to None, adopt foreign ones.
        if all(g is None for g in current):
            self.main_grad.copy_(reduced)
        else:
            with torch.no_grad():
                for i, g in enumerate(current):
                    ours = self._grad_dtensors[i]
                    if g is None:
                        self.layout.local_view(self.main_grad, i, rank).zero_()
                    elif g is not ours:
                        local = g.to_local() if isinstance(g, DTensor) else g
                        self.layout.local_view(self.main_grad, i, rank).copy_(local)
            self.main_grad.add_(reduced)
        for p, g in zip(self.sharded_params, self._grad_dtensors, strict=True):
            if g is not None:
                p.grad = g

    # -- accounting --------------------------------------------------------------------------

    def unsharded_bytes(self) -> int:
        return 0 if self.aliased else _storage_bytes(self.unsharded)

    def main_bytes(self) -> int:
        return _storage_bytes(self.main)

    def main_grad_bytes(self) -> int:
        return 0 if self.main_grad is None else _storage_bytes(self.main_grad)

    def grad_acc_bytes(self) -> int:
        return 0 if self.grad_acc is None else _storage_bytes(self.grad_acc)
