"""Model-state memory of one rank: parameters, gradients and optimizer state, computed from that
rank's (meta) parameters with the data-parallel wrappers' own layout rules.

- ``ddp``: the model is cast to the compute dtype (``train.bf16`` / ``train.fp16``); gradients
  live in the flat buffers :func:`~mcore.parallel.distributed.build_grad_buffers` lays out
  (``ddp.grad_reduce_in_fp32`` picks their dtype; buckets padded for the distributed
  optimizer); the optimizer keeps an fp32 main copy of every non-fp32 parameter and its state
  (Adam: two fp32 moments; SGD: one momentum), for this rank's shard of every bucket under
  ``optimizer.use_distributed_optimizer`` (dense buckets over ``dp x cp``, expert buckets over
  ``edp``); data-parallel rank 0's shard is reported (the last rank's holds the padding).
- ``megatron_fsdp``: parameters stay fp32 and are sharded per parameter along dim 0
  (``ceil(rows / N)`` rows per rank, N = ``dp x cp`` or ``edp``, divided by
  ``fsdp.num_distributed_optimizer_instances``; 1 for ``no_shard``); the shards are the main
  weights and their gradients; ``no_shard`` and ``optim`` also keep a full gradient
  accumulator, and every strategy but ``optim_grads_params`` a full compute-dtype copy of the
  parameters (that one gathers them per layer: counted as transient).
- ``optimizer.optimizer_cpu_offload``: the first ``optimizer_offload_fraction`` of the
  optimizer's shards (by elements, whole shards, as the optimizer picks them) keep their main
  weights and state on the CPU.

The Adam step counter (one scalar per parameter) is not counted.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mcore.parallel.distributed.buckets import build_grad_buffers
from mcore.parallel.grads import is_expert_parallel
from mcore.parallel.state import ParallelState

OPTIMIZER_STATES = {"adam": 2, "sgd": 1}
"""fp32 tensors of optimizer state per main weight (unknown optimizers are counted as Adam)."""


@dataclass
class ModelState:
    """Bytes of one rank's model state."""

    params: int
    """Parameters as the model holds them (compute dtype for ddp, fp32 shards + persistent
    compute copies for megatron_fsdp)."""
    grads: int
    """Gradient buffers (shards and persistent accumulators)."""
    optimizer: int
    """fp32 main weights (where they are copies) and optimizer state on the GPU."""
    optimizer_cpu: int
    """The same, offloaded to the CPU."""
    transient: int = 0
    """Model-state memory that exists only part of the step (FSDP's gathered layers)."""
    num_params: int = 0
    """Parameter elements this rank holds (a tied embedding's second copy included)."""
    expert_params: int = 0
    """Of which expert parameters."""
    sync: dict[str, dict[str, int]] | None = None
    """Per data-parallel group (``dp`` for ``dp x cp``, ``edp``), the bytes its gradient
    reduction reads (``grads``) and its parameter gathering writes (``params``) per rank, full
    size: what :mod:`.comm` turns into bytes on the wire."""


def compute_dtype(config: Any) -> torch.dtype | None:
    train = config.train
    return torch.bfloat16 if train.bf16 else torch.float16 if train.fp16 else None


def _optimizer_states(config: Any) -> int:
    opt = config.optimizer
    if opt.optimizer == "sgd" and getattr(opt, "sgd_momentum", 0.9) == 0:
        return 0
    return OPTIMIZER_STATES.get(opt.optimizer, 2)


def _offload_fraction(config: Any) -> float:
    opt = config.optimizer
    return opt.optimizer_offload_fraction if opt.optimizer_cpu_offload else 0.0


def _optimizer_bytes(shards: list[tuple[int, torch.dtype]], config: Any) -> tuple[int, int]:
    """(GPU, CPU) bytes of main weights and state for shards ``(numel, param dtype)`` in the
    optimizer's order, with its offload rule."""
    states, fraction = _optimizer_states(config), _offload_fraction(config)
    budget, used, gpu, cpu = fraction * sum(n for n, _ in shards), 0, 0, 0
    for numel, dtype in shards:
        offloaded = fraction > 0 and used < budget
        used += numel if offloaded else 0
        main = 4 * numel if (dtype != torch.float32 or offloaded) else 0
        state = 4 * states * numel
        if offloaded:
            cpu += main + state
        else:
            gpu += main + state
    return gpu, cpu


def ddp_model_state(chunks: list[nn.Module], ps: ParallelState, config: Any) -> ModelState:
    """What ``wrap_ddp`` and the mixed-precision (or distributed) optimizer hold on this rank.

    Casts ``chunks`` (on meta) to the compute dtype and lays out their gradient buffers, as
    the wrapper does."""
    dtype = compute_dtype(config)
    module = nn.ModuleList(chunks) if len(chunks) > 1 else chunks[0]
    if dtype is not None:
        module.to(dtype)
    ddp, distributed = config.ddp, config.optimizer.use_distributed_optimizer
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    bucket_bytes = int(ddp.bucket_size_mb * 2**20)
    params = grads = 0
    shards: list[tuple[int, torch.dtype]] = []
    sync: dict[str, dict[str, int]] = {}
    for expert, size in ((False, ps.dp_cp_size), (True, ps.edp_size)):
        members = [p for _, p in named if is_expert_parallel(p) == expert]
        if not members:
            continue
        buffers, buckets = build_grad_buffers(
            members,
            bucket_bytes=bucket_bytes,
            grad_reduce_in_fp32=ddp.grad_reduce_in_fp32,
            shard_count=size if distributed else 1,
        )
        grads += sum(b.numel * b.grad_dtype.itemsize for b in buffers)
        sync["edp" if expert else "dp"] = {
            "grads": sum(b.numel * b.grad_dtype.itemsize for b in buffers),
            "params": sum(b.numel * b.param_dtype.itemsize for b in buffers) if distributed else 0,
        }
        if distributed:  # parameters live in padded flat buffers of the same layout
            params += sum(b.numel * b.param_dtype.itemsize for b in buffers)
            for bucket in buckets:  # this rank's (rank 0's) shard of each bucket
                lo, hi = bucket.shard_range(0, size)
                for p in bucket.params:
                    start, end = bucket.buffer.range_of(p)
                    if max(start, lo) < min(end, hi):
                        shards.append((min(end, hi) - max(start, lo), p.dtype))
        else:
            params += sum(p.numel() * p.element_size() for p in members)
    if not distributed:
        shards = [(p.numel(), p.dtype) for _, p in named]
    frozen = sum(p.numel() * p.element_size() for p in module.parameters() if not p.requires_grad)
    gpu, cpu = _optimizer_bytes(shards, config)
    return ModelState(
        params=params + frozen,
        grads=grads,
        optimizer=gpu,
        optimizer_cpu=cpu,
        sync=sync,
        **_counts(module),
    )


def fsdp_model_state(chunks: list[nn.Module], ps: ParallelState, config: Any) -> ModelState:
    """What megatron_fsdp's ``fully_shard`` units and the optimizer hold on this rank."""
    fsdp = config.fsdp
    strategy = fsdp.data_parallel_sharding_strategy
    replicas = fsdp.num_distributed_optimizer_instances
    dtype = compute_dtype(config)
    reduce_dtype = torch.float32 if dtype is not None and fsdp.grad_reduce_in_fp32 else dtype
    module = nn.ModuleList(chunks) if len(chunks) > 1 else chunks[0]
    main = grads = compute = 0
    units: dict[str, int] = {}
    shards: list[tuple[int, torch.dtype]] = []
    sync = {"dp": {"grads": 0, "params": 0}, "edp": {"grads": 0, "params": 0}}
    for name, p in module.named_parameters():
        group = ps.edp_size if is_expert_parallel(p) else ps.dp_cp_size
        world = 1 if strategy == "no_shard" else group // replicas
        rows = p.shape[0] if p.ndim else 1
        shard = math.ceil(rows / world) * (p.numel() // max(rows, 1))
        unsharded = world * shard
        item = p.element_size()
        main += shard * item
        if p.requires_grad:
            grads += shard * item  # the sharded main gradient
            if strategy in ("no_shard", "optim"):  # a full accumulator, kept all step
                grads += unsharded * (reduce_dtype or p.dtype).itemsize
            shards.append((shard, p.dtype))
        key = "edp" if is_expert_parallel(p) else "dp"
        sync[key]["params"] += unsharded * (dtype or p.dtype).itemsize
        if p.requires_grad:
            sync[key]["grads"] += unsharded * (reduce_dtype or p.dtype).itemsize
        aliased = world == 1 and (dtype is None or dtype == p.dtype)
        copy = 0 if aliased else unsharded * (dtype or p.dtype).itemsize
        if strategy == "optim_grads_params":
            key = _unit_of(name, is_expert_parallel(p))
            units[key] = units.get(key, 0) + copy
        else:
            compute += copy
    gpu, cpu = _optimizer_bytes(shards, config)
    # Mains of fp32 DTensor shards are the parameters themselves: no copy (unless offloaded).
    # The two largest gathered units: the one computing and the one prefetched.
    transient = sum(sorted(units.values())[-2:])
    return ModelState(
        params=main + compute,
        grads=grads,
        optimizer=gpu,
        optimizer_cpu=cpu,
        transient=transient,
        sync=sync,
        **_counts(module),
    )


def _unit_of(name: str, expert: bool) -> str:
    """The ``fully_shard`` unit a parameter belongs to: its layer (experts apart), or the root."""
    match = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    if match is None:
        return "root"
    return f"layer{match.group(1)}" + (".experts" if expert else "")


def _counts(module: nn.Module) -> dict[str, int]:
    params = list(module.parameters())
    return {
        "num_params": sum(p.numel() for p in params),
        "expert_params": sum(p.numel() for p in params if is_expert_parallel(p)),
    }


def model_state(chunks: list[nn.Module], ps: ParallelState, config: Any) -> ModelState:
    """This rank's model state under the run's data-parallel wrapper (``train.data_parallel``)."""
    wrapper = config.train.data_parallel
    if wrapper == "megatron_fsdp":
        return fsdp_model_state(chunks, ps, config)
    if wrapper != "ddp":
        raise ValueError(
            f"mcore plan knows the memory of the 'ddp' and 'megatron_fsdp' wrappers, not "
            f"train.data_parallel = {wrapper!r}"
        )
    return ddp_model_state(chunks, ps, config)
