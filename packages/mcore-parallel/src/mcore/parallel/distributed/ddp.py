"""``DistributedDataParallel``: bucketed gradient reduction over the data-parallel group that
overlaps backward.

How gradients flow:

1. Backward accumulates each parameter's gradient into ``param.main_grad``, a view into a flat
   buffer (see :mod:`mcore.parallel.distributed.buckets`), and clears ``param.grad``, as in
   Megatron-Core. One gradient layout then serves every precision: with ``grad_reduce_in_fp32``
   the buffer is fp32 while the parameters stay bf16/fp16. Optimizers read ``main_grad``.
2. When the last gradient of a bucket arrives (a post-accumulate-grad hook), the bucket's
   reduction is launched asynchronously on the ``dp_cp`` group, while backward goes on with the
   earlier layers. Buckets launch strictly in order, so every rank issues the same collectives
   in the same sequence even if autograd completes them in a different order.
3. ``finish_grad_sync()`` launches what is left, waits for everything and sums the gradients of
   parameters marked ``reduce_grad_over_tp`` over the TP group.

Gradients end up as the *mean* over the ``dp * cp`` ranks: each bucket is divided by that size
before a summing collective (or averaged by the collective with ``average_in_collective``).

Expert parameters (marked by :func:`mcore.parallel.mark_expert_parallel`) differ between
expert-parallel ranks, so they live in buffers of their own, reduced over the expert-data-parallel
group ``edp``. Each expert rank's gradient already sums the tokens that every rank of its
expert-parallel group sent it, so the sum over ``edp`` covers the whole batch and is divided by
the ``dp * cp`` size like the rest.
For gradient accumulation run every micro-batch but the last under ``no_sync()``; scale each
micro-batch's loss by ``1 / num_microbatches`` as usual.

With ``use_distributed_optimizer`` buckets are reduce-scattered instead of all-reduced: after
``finish_grad_sync()`` only this rank's shard of each bucket holds reduced gradients (the rest of
the buffer holds this rank's local gradients and must not be read), and parameters live in a
flat buffer into which the optimizer all-gathers updated shards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from mcore.parallel.distributed.buckets import Bucket, GradBuffer, build_grad_buffers
from mcore.parallel.distributed.config import DDPConfig
from mcore.parallel.grads import is_expert_parallel

if TYPE_CHECKING:
    from mcore.parallel.state import ParallelState


class DistributedDataParallel(nn.Module):
    """Wrap ``module`` for data-parallel training over ``parallel_state.dp_cp_group``.

    ``forward`` is the module's. After backward call :meth:`finish_grad_sync` (the optimizers
    here do it in ``step()`` if it has not been done), and :meth:`zero_grad_buffer` before the
    next step's first backward (the optimizers' ``zero_grad()`` does).

    ``bucket_size_mb`` sets how many gradient bytes one collective reduces (``None``: one bucket
    per buffer). ``overlap_grad_reduce=False`` defers every reduction to ``finish_grad_sync``.
    """

    def __init__(
        self,
        module: nn.Module,
        parallel_state: ParallelState,
        *,
        bucket_size_mb: float | None = 25.0,
        grad_reduce_in_fp32: bool = False,
        overlap_grad_reduce: bool = True,
        average_in_collective: bool = False,
        use_distributed_optimizer: bool = False,
        reduce_scatter_with_fp32_accumulation: bool = False,
    ) -> None:
        super().__init__()
        if reduce_scatter_with_fp32_accumulation and not use_distributed_optimizer:
            raise ValueError(
                "reduce_scatter_with_fp32_accumulation needs use_distributed_optimizer=True "
                "(config: ddp.reduce_scatter_with_fp32_accumulation and "
                "optimizer.use_distributed_optimizer): without the distributed optimizer "
                "gradients are all-reduced, not reduce-scattered"
            )
        if bucket_size_mb is not None and bucket_size_mb <= 0:
            raise ValueError(f"bucket_size_mb must be > 0 or None, got {bucket_size_mb}")
        self.module = module
        self.parallel_state = parallel_state
        self.overlap_grad_reduce = overlap_grad_reduce
        self.average_in_collective = average_in_collective
        self.use_distributed_optimizer = use_distributed_optimizer
        self.reduce_scatter_with_fp32_accumulation = reduce_scatter_with_fp32_accumulation
        self.dp_group = parallel_state.dp_cp_group
        self.dp_size = parallel_state.dp_cp_size
        self.dp_rank = parallel_state.dp_cp_rank

        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self._names = {id(p): n for n, p in named}
        self.params = [p for _, p in named]
        bucket_bytes = None if bucket_size_mb is None else int(bucket_size_mb * 2**20)
        self.grad_buffers: list[GradBuffer] = []
        self.buckets: list[Bucket] = []
        ps = parallel_state
        dense = [p for p in self.params if not is_expert_parallel(p)]
        experts = [p for p in self.params if is_expert_parallel(p)]
        for params, group, size, rank in (
            (dense, ps.dp_cp_group, ps.dp_cp_size, ps.dp_cp_rank),
            (experts, ps.edp_group, ps.edp_size, ps.edp_rank),
        ):
            if not params:
                continue
            buffers, buckets = build_grad_buffers(
                params,
                bucket_bytes=bucket_bytes,
                grad_reduce_in_fp32=grad_reduce_in_fp32,
                shard_count=size if use_distributed_optimizer else 1,
                contiguous_params=use_distributed_optimizer,
            )
            # Expert buckets launch after the dense ones: the same order on every rank.
            for bucket in buckets:
                bucket.index += len(self.buckets)
                bucket.group, bucket.group_size, bucket.group_rank = group, size, rank
            self.grad_buffers += buffers
            self.buckets += buckets
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in self.params
        ]
        self._sync_enabled = True
        self._in_flight: list[tuple[Any, Callable[[], None] | None]] = []
        self.zero_grad_buffer()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    # The wrapper adds no state: checkpoints hold the module's own keys.
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.module.load_state_dict(*args, **kwargs)

    def param_name(self, param: nn.Parameter) -> str:
        """The module's name for ``param`` (for messages and weight-decay rules)."""
        return self._names[id(param)]

    # -- the gradient cycle -------------------------------------------------------------------

    def zero_grad_buffer(self) -> None:
        """Zero every gradient and re-arm the buckets for the next step's backward."""
        self._wait_in_flight()  # a pending collective would write into the zeroed buffer
        for buf in self.grad_buffers:
            buf.grad_data.zero_()
        for p in self.params:
            p.grad = None
        self._pending = [{id(p) for p in b.params} for b in self.buckets]
        self._next_launch = 0
        self._synced = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``nn.Module.zero_grad`` would only drop ``.grad``: zero the buffer instead."""
        self.zero_grad_buffer()

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients without reducing them (all micro-batches but the last)."""
        previous, self._sync_enabled = self._sync_enabled, False
        try:
            yield
        finally:
            self._sync_enabled = previous

    def finish_grad_sync(self) -> None:
        """Launch the buckets not yet launched, wait for every reduction, then sum the gradients
        of ``reduce_grad_over_tp`` parameters over the TP group. Idempotent until the next
        :meth:`zero_grad_buffer`."""
        if self._synced:
            return
        # Without overlap every bucket is still pending here. With overlap a pending bucket holds
        # a parameter that got no gradient this step (unused): its zeros are reduced with the
        # rest, in the same order on every rank.
        while self._next_launch < len(self.buckets):
            self._launch(self.buckets[self._next_launch])
            self._next_launch += 1
        self._wait_in_flight()
        self._reduce_tp_partial_grads()
        self._synced = True

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        if param.grad is None:
            return
        param.main_grad.add_(param.grad)  # pyright: ignore[reportAttributeAccessIssue]
        param.grad = None  # the buffer holds it now; free the autograd copy
        if not self._sync_enabled:
            return
        pending = self._pending[self._bucket_of[id(param)].index]
        if self._synced or id(param) not in pending:
            raise RuntimeError(
                f"parameter {self.param_name(param)!r} received a second gradient since its "
                "bucket was reduced: run all micro-batches but the last under no_sync(), and "
                "call zero_grad_buffer() (the optimizer's zero_grad()) before the next step"
            )
        pending.discard(id(param))
        if self.overlap_grad_reduce and not pending:
            self._launch_ready_buckets()

    def _launch_ready_buckets(self) -> None:
        # Strictly in order: all ranks must issue the same collectives in the same sequence.
        while self._next_launch < len(self.buckets) and not self._pending[self._next_launch]:
            self._launch(self.buckets[self._next_launch])
            self._next_launch += 1

    def _launch(self, bucket: Bucket) -> None:
        """Start ``bucket``'s asynchronous reduction over its group (dp_cp, or edp)."""
        grad = bucket.grad_data
        op = dist.ReduceOp.SUM
        if self.average_in_collective and bucket.group_size == self.dp_size:
            op = dist.ReduceOp.AVG
        elif self.dp_size > 1:
            grad.mul_(1.0 / self.dp_size)  # the mean over dp_cp, whatever group sums it
        if bucket.group_size == 1:
            return
        group = bucket.group
        if not self.use_distributed_optimizer:
            work = dist.all_reduce(grad, op=op, group=group, async_op=True)
            self._in_flight.append((work, None))
        elif self.reduce_scatter_with_fp32_accumulation:
            self._in_flight.append(self._launch_fp32_reduce_scatter(bucket, op))
        else:
            shard = bucket.shard(grad, bucket.group_rank, bucket.group_size)
            work = dist.reduce_scatter_tensor(shard, grad, op=op, group=group, async_op=True)
            self._in_flight.append((work, None))

    def _launch_fp32_reduce_scatter(
        self, bucket: Bucket, op: Any
    ) -> tuple[Any, Callable[[], None]]:
        """Reduce-scatter whose sum is taken in fp32 whatever the gradient dtype.

        An all-to-all hands every rank the chunk of every other rank that falls in its own
        shard; the chunks are summed locally in fp32 and rounded once. A ring reduce-scatter in
        bf16 would instead round after every one of its ``dp - 1`` additions.
        """
        grad = bucket.grad_data
        size, rank = bucket.group_size, bucket.group_rank
        received = torch.empty_like(grad)
        work = dist.all_to_all_single(received, grad, group=bucket.group, async_op=True)

        def accumulate() -> None:
            total = received.view(size, -1).sum(dim=0, dtype=torch.float32)
            if op == dist.ReduceOp.AVG:
                total.div_(size)
            bucket.shard(grad, rank, size).copy_(total)

        return work, accumulate

    def _wait_in_flight(self) -> None:
        for work, then in self._in_flight:
            work.wait()
            if then is not None:
                then()
        self._in_flight = []

    def _reduce_tp_partial_grads(self) -> None:
        """Sum over TP the gradients of parameters marked ``reduce_grad_over_tp``.

        :func:`mcore.parallel.reduce_tp_partial_grads` does this for ``param.grad``; here the
        gradients live in ``main_grad``. Summing commutes with the DP mean, so doing it after the
        DP reduction is exact (and under the distributed optimizer the whole ``main_grad`` is
        summed: each rank's valid shard sums with the same shard of its TP peers).
        """
        tp_group, tp_size = self.parallel_state.tp_group, self.parallel_state.tp_size
        if tp_group is None or tp_size == 1:
            return
        grads = [p.main_grad for p in self.params if getattr(p, "reduce_grad_over_tp", False)]  # pyright: ignore[reportAttributeAccessIssue]
        if not grads:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for same in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in same])
            dist.all_reduce(flat, group=tp_group)
            offset = 0
            for g in same:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    def broadcast_params(self) -> None:
        """Make the data-parallel replicas identical (see :func:`broadcast_params`)."""
        broadcast_params(self.module, self.parallel_state)


def compute_dtype(config: Any) -> torch.dtype | None:
    """The dtype a run's model computes in: bf16 or fp16 per ``[train]``, else ``None``."""
    if "train" not in config:
        return None
    train = config.train
    return torch.bfloat16 if train.bf16 else torch.float16 if train.fp16 else None


def broadcast_params(module: nn.Module, parallel_state: ParallelState) -> None:
    """Copy the parameters and buffers of ``dp_cp`` rank 0 to the other ranks of its group
    (expert parameters: of ``edp`` rank 0 over ``edp``), so replicas start identical even if
    they were initialised differently. Data-parallel wrappers call it before training."""
    ps = parallel_state
    experts = [p for p in module.parameters() if is_expert_parallel(p)]
    dense = [p for p in module.parameters() if not is_expert_parallel(p)]
    for tensors, group, size in (
        ([*dense, *module.buffers()], ps.dp_cp_group, ps.dp_cp_size),
        (experts, ps.edp_group, ps.edp_size),
    ):
        if group is None or size == 1:
            continue
        src = dist.get_global_rank(group, 0)
        for tensor in tensors:
            dist.broadcast(tensor.data, src=src, group=group)


def wrap_ddp(
    model: nn.Module, parallel_state: ParallelState, config: Any
) -> DistributedDataParallel:
    """The ``data_parallel`` registry's ``ddp`` entry: wrap ``model`` as the run's config says.

    Casts the model to the compute dtype (``train.bf16`` / ``train.fp16``), reads the ``[ddp]``
    section (defaults when absent) and ``optimizer.use_distributed_optimizer``, then makes the
    data-parallel replicas identical (``broadcast_params``).
    """
    ddp = config.ddp if "ddp" in config else DDPConfig()
    optimizer = config.optimizer if "optimizer" in config else None
    dtype = compute_dtype(config)
    if dtype is not None:  # the optimizer keeps fp32 main weights of the cast parameters
        model = model.to(dtype)
    wrapped = DistributedDataParallel(
        model,
        parallel_state,
        bucket_size_mb=ddp.bucket_size_mb,
        grad_reduce_in_fp32=ddp.grad_reduce_in_fp32,
        overlap_grad_reduce=ddp.overlap_grad_reduce,
        average_in_collective=ddp.average_in_collective,
        use_distributed_optimizer=bool(optimizer and optimizer.use_distributed_optimizer),
        reduce_scatter_with_fp32_accumulation=ddp.reduce_scatter_with_fp32_accumulation,
    )
    wrapped.broadcast_params()
    return wrapped
