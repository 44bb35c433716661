"""One ``fully_shard`` call's state (a unit) and the hooks that drive it through a step.

A unit owns the parameters of its module that no nested ``fully_shard`` call took, grouped into
buckets. Outside forward the module holds the sharded ``DTensor`` parameters; its forward runs on
the gathered ones. One step of a unit:

1. **pre-forward**: finish this unit's gather (issued earlier by a prefetch, or now), issue the
   gather of the unit that ran next in the first iteration, put the gathered parameters into the
   module, cast floating inputs to the compute dtype;
2. **post-forward**: put the sharded parameters back; under ``optim_grads_params`` free the
   gathered copy (except on the root, which backward needs at once); hook the outputs so that
   their gradient triggers:
3. **pre-backward**: gather again (``optim_grads_params``) and prefetch the unit that runs
   backward next; queue the end-of-backward callback once per backward;
4. **post-backward**, per parameter (``register_post_accumulate_grad_hook``): fold the gradient
   into the bucket's accumulator and drop it; when a bucket has all its gradients, issue its
   reduce-scatter (or all-reduce); when a unit has all of them, free its gathered copy;
5. **end of backward** (the queued callback, once for the whole root): reduce partly filled
   buckets, wait for every reduction, set ``param.grad`` to the gradient-shard ``DTensor``s.

Activation recompute re-runs forwards *inside* backward; those forwards find the parameters
gathered and must neither free them nor register hooks, which is why the hooks ask autograd
whether a backward is running.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.autograd import Variable

from megatron_fsdp.bucket import (
    INIT_PENDING,
    Bucket,
    BufferPool,
    MeshPlan,
    Strategy,
    install_optimizer_hook,
)
from megatron_fsdp.policies import MixedPrecisionPolicy, OffloadPolicy

_MANAGED = "_megatron_fsdp_managed"  # marks a sharded parameter so enclosing units skip it


class State(enum.Enum):
    IDLE = "idle"
    FORWARD = "forward"
    PRE_BACKWARD = "pre_backward"


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _map_tensors(fn: Callable[[torch.Tensor], Any], value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple | list):
        mapped = [_map_tensors(fn, v) for v in value]
        return type(value)(*mapped) if hasattr(value, "_fields") else type(value)(mapped)
    if isinstance(value, dict):
        return {k: _map_tensors(fn, v) for k, v in value.items()}
    return value


# Gradient reductions left running while backward goes on. Each holds a full-size accumulator,
# so waiting for the oldest beyond this bound keeps at most two buckets' full gradients alive
# (instead of the whole model's) while still overlapping communication with compute.
MAX_REDUCTIONS_IN_FLIGHT = 2


class RootContext:
    """What every unit under one root shares: execution order, gather buffers, backward end."""

    def __init__(self, root: FSDPUnit, units: list[FSDPUnit]) -> None:
        self.root = root
        self.units = units
        self.pool = BufferPool(persistent=root.double_buffer)
        self.forward_order: list[FSDPUnit] = []
        self.backward_order: list[FSDPUnit] = []  # reverse of the order forwards finished
        self.recording = True
        self.reductions: list[Bucket] = []
        self._callback_queued = False

    def record_pre_forward(self, unit: FSDPUnit) -> None:
        if self.recording and unit not in self.forward_order:
            self.forward_order.append(unit)

    def record_post_forward(self, unit: FSDPUnit) -> None:
        if self.recording and unit not in self.backward_order:
            self.backward_order.insert(0, unit)
        if unit is self.root:  # the first full forward fixes the prefetch order
            self.recording = False

    @staticmethod
    def _after(order: list[FSDPUnit], unit: FSDPUnit) -> FSDPUnit | None:
        try:
            i = order.index(unit)
        except ValueError:
            return None
        return order[i + 1] if i + 1 < len(order) else None

    def next_forward(self, unit: FSDPUnit) -> FSDPUnit | None:
        return None if self.recording else self._after(self.forward_order, unit)

    def next_backward(self, unit: FSDPUnit) -> FSDPUnit | None:
        return None if self.recording else self._after(self.backward_order, unit)

    def add_reduction(self, bucket: Bucket) -> None:
        """Issue ``bucket``'s reduction; finish the oldest if too many are in flight."""
        bucket.start_reduce()
        self.reductions.append(bucket)
        while len(self.reductions) > MAX_REDUCTIONS_IN_FLIGHT:
            self.reductions.pop(0).finish_reduce()

    def queue_end_of_backward(self) -> None:
        if not self._callback_queued:
            self._callback_queued = True
            Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        self._callback_queued = False
        for unit in self.units:  # a fixed order, the same on every rank
            unit.reduce_leftovers()
        for bucket in self.reductions:
            bucket.finish_reduce()
        self.reductions.clear()
        for unit in self.units:
            unit.end_backward()


class FSDPUnit:
    """The buckets and hooks of one ``fully_shard(module)`` call."""

    def __init__(
        self,
        module: nn.Module,
        *,
        plan: MeshPlan,
        strategy: Strategy,
        device: torch.device,
        mp_policy: MixedPrecisionPolicy,
        offload_policy: OffloadPolicy | None,
        bucket_size_bytes: int | None,
        double_buffer: bool,
        prefetch: bool,
        gradient_divide_factor: float | None,
        overlap_grad_reduce: bool = True,
    ) -> None:
        self.module = module
        self.overlap_grad_reduce = overlap_grad_reduce
        self.plan = plan
        self.strategy = strategy
        self.mp_policy = mp_policy
        self.double_buffer = double_buffer
        self.prefetch = prefetch
        self.gradient_divide_factor = float(gradient_divide_factor or plan.mesh.size())
        self.requires_gradient_sync = True
        self.ctx: RootContext | None = None
        self.state = State.IDLE

        owners = self._collect_params(module)
        params = list(owners)
        # One dtype per bucket; split further so no bucket exceeds bucket_size_bytes.
        groups: list[list[nn.Parameter]] = []
        for dtype in dict.fromkeys(p.dtype for p in params):
            group, size = [], 0
            for p in (p for p in params if p.dtype == dtype):
                nbytes = p.numel() * p.element_size()
                if group and bucket_size_bytes is not None and size + nbytes > bucket_size_bytes:
                    groups.append(group)
                    group, size = [], 0
                group.append(p)
                size += nbytes
            if group:
                groups.append(group)
        pin = None if offload_policy is None else offload_policy.pin_memory
        self.buckets = [
            Bucket(
                group,
                plan=plan,
                strategy=strategy,
                device=device,
                param_dtype=mp_policy.param_dtype,
                reduce_dtype=mp_policy.reduce_dtype,
                offload_pin_memory=pin,
            )
            for group in groups
        ]
        # (bucket, index, places the parameter is registered) for every managed parameter.
        self.slots: list[tuple[Bucket, int, list[tuple[nn.Module, str]]]] = []
        by_id = {id(p): places for p, places in owners.items()}
        for bucket, group in zip(self.buckets, groups, strict=True):
            for i, p in enumerate(group):
                self.slots.append((bucket, i, by_id[id(p)]))
                setattr(bucket.sharded_params[i], _MANAGED, True)
                if p.requires_grad:
                    bucket.unsharded_params[i].register_post_accumulate_grad_hook(
                        self._make_grad_hook(bucket, i)
                    )
        self.has_frozen = any(not p.requires_grad for p in params)
        install_optimizer_hook()
        self._move_buffers(module, device)
        self._register(unsharded=False)
        module.register_forward_pre_hook(self._pre_forward, prepend=True, with_kwargs=True)
        module.register_forward_hook(self._post_forward)

    # -- setup ---------------------------------------------------------------------------------

    @staticmethod
    def _collect_params(module: nn.Module) -> dict[nn.Parameter, list[tuple[nn.Module, str]]]:
        """This unit's parameters (in definition order) and every place each is registered."""
        owners: dict[nn.Parameter, list[tuple[nn.Module, str]]] = {}
        for sub in module.modules():
            for name, p in sub._parameters.items():
                if p is None or getattr(p, _MANAGED, False):
                    continue
                owners.setdefault(p, []).append((sub, name))
        return owners

    @staticmethod
    def _move_buffers(module: nn.Module, device: torch.device) -> None:
        for sub in module.modules():
            for name, buf in sub._buffers.items():
                if buf is None or buf.device == device:
                    continue
                if buf.is_meta:  # allocated here, filled by whoever built the model on meta
                    moved = torch.zeros_like(buf, device=device)
                    vars(moved).update(vars(buf))
                    setattr(moved, INIT_PENDING, True)
                    sub._buffers[name] = moved
                else:
                    sub._buffers[name] = buf.to(device)

    def _register(self, unsharded: bool) -> None:
        """Put the gathered (compute) or the sharded (DTensor) parameters into the modules."""
        for bucket, i, places in self.slots:
            param = bucket.unsharded_params[i] if unsharded else bucket.sharded_params[i]
            for owner, name in places:
                owner._parameters[name] = param

    def sharded_parameters(self) -> Iterator[nn.Parameter]:
        for bucket, i, _ in self.slots:
            yield bucket.sharded_params[i]

    @property
    def is_root(self) -> bool:
        return self.ctx is not None and self.ctx.root is self

    def _lazy_root(self) -> RootContext:
        # The first unit to run forward is the outermost; it adopts every unit below it.
        if self.ctx is None:
            units = [u for m in self.module.modules() if (u := getattr(m, "_fsdp_unit", None))]
            ctx = RootContext(self, units)
            for unit in units:
                unit.ctx = ctx
        return self._context

    @property
    def _context(self) -> RootContext:
        """The root's context, which the root's first forward gives every unit below it."""
        assert self.ctx is not None, "the root unit's first forward sets every unit's context"
        return self.ctx

    # -- gather / free -------------------------------------------------------------------------

    def start_gathers(self) -> None:
        for bucket in self.buckets:
            bucket.start_gather(self._context.pool)

    def finish_gathers(self) -> None:
        for bucket in self.buckets:
            bucket.finish_gather(self._context.pool)

    def unshard(self) -> None:
        """Gather every bucket of this unit now."""
        self._lazy_root()
        self.start_gathers()
        self.finish_gathers()

    def reshard(self) -> None:
        """Free the gathered copy where the strategy shards parameters."""
        if self.strategy.reshard_params:
            for bucket in self.buckets:
                bucket.free_unsharded()

    def invalidate(self) -> None:
        """Make the next forward re-gather (the main weights changed behind our back)."""
        for bucket in self.buckets:
            bucket.invalidate()

    # -- hooks ---------------------------------------------------------------------------------

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        ctx = self._lazy_root()
        if not _in_backward():
            ctx.record_pre_forward(self)
            self.state = State.FORWARD
            for bucket in self.buckets:
                bucket.release_cleared_grads()
            self.start_gathers()
            # Issue the next unit's gather before copying this one out: two buffers in flight.
            nxt = ctx.next_forward(self) if self.prefetch else None
            if nxt is not None:
                nxt.start_gathers()
        self.finish_gathers()
        self._register(unsharded=True)
        dtype = self.mp_policy.param_dtype
        if dtype is not None and self.mp_policy.cast_forward_inputs:

            def cast(t: torch.Tensor) -> torch.Tensor:
                return t.to(dtype) if t.is_floating_point() else t

            args, kwargs = _map_tensors(cast, args), _map_tensors(cast, kwargs)
        return args, kwargs

    def _post_forward(self, module: nn.Module, args: tuple, output: Any) -> Any:
        self._register(unsharded=False)
        if _in_backward():  # a recompute: backward is about to use these parameters
            return output
        self._context.record_post_forward(self)
        self.state = State.IDLE
        if not self.is_root:
            self.reshard()
        if torch.is_grad_enabled():
            for t in self._grad_tensors(output):
                t.register_hook(self._pre_backward)
        dtype = self.mp_policy.output_dtype
        if dtype is not None:
            output = _map_tensors(lambda t: t.to(dtype) if t.is_floating_point() else t, output)
        return output

    @staticmethod
    def _grad_tensors(output: Any) -> list[torch.Tensor]:
        found: list[torch.Tensor] = []
        _map_tensors(lambda t: found.append(t) if t.requires_grad else None, output)
        return found

    def _pre_backward(self, grad: torch.Tensor) -> None:
        if self.state is State.PRE_BACKWARD:
            return
        self.state = State.PRE_BACKWARD
        self._context.queue_end_of_backward()
        self.start_gathers()
        nxt = self._context.next_backward(self) if self.prefetch else None
        if nxt is not None and nxt.strategy.reshard_params:
            nxt.start_gathers()
        self.finish_gathers()

    def _make_grad_hook(self, bucket: Bucket, index: int) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            grad, param.grad = param.grad, None  # folded into the accumulator; free it now
            if grad is None:
                return
            bucket.fold_grad(index, grad, 1.0 / self.gradient_divide_factor)
            if self.overlap_grad_reduce and bucket.all_grads_folded and self._reduce_now():
                self._context.add_reduction(bucket)
            if (
                self.strategy.reshard_params
                and not self.has_frozen
                and all(b.all_grads_folded or b.reduced_this_backward for b in self.buckets)
            ):
                self.reshard()

        return hook

    def _reduce_now(self) -> bool:
        # Unsharded gradients (no_shard, optim) may wait for the last micro-batch; sharded ones
        # are reduce-scattered every backward so that a full gradient never persists.
        return self.requires_gradient_sync or not self.strategy.keep_full_grads

    def reduce_leftovers(self) -> None:
        """Reduce every bucket not reduced yet in this backward.

        That includes buckets that got no gradient at all on this rank (an expert that
        received no tokens, a branch this rank's data did not take): the collective must run on
        every rank of the mesh, whatever each rank's data touched, so they reduce zeros.
        """
        if not self._reduce_now():
            return
        for bucket in self.buckets:
            if bucket.trainable and not bucket.reduced_this_backward:
                self._context.add_reduction(bucket)

    def end_backward(self) -> None:
        for bucket in self.buckets:
            bucket.end_backward()
        self.reshard()
        # A recompute that stopped early skipped its post-forward: restore the DTensors.
        self._register(unsharded=False)
        self.state = State.IDLE
