"""The runtime ``mcore train`` runs on: the parallel layout, how a model is wrapped and
optimised, the pipeline schedule, and the reductions between backward and the optimizer step.

The core's training loop knows none of this package; it asks the ``mcore_training_runtime``
hook, which this package implements with :class:`MeshTrainingRuntime`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.distributed as dist

from mcore.core.training.profiling import ranges
from mcore.parallel.compile import compile_regions
from mcore.parallel.context_parallel import split_for_context_parallel
from mcore.parallel.init import materialize, peek_seed
from mcore.parallel.optimizer.scheduler import build_lr_scheduler
from mcore.parallel.pipeline import allreduce_embedding_grads, get_forward_backward_func
from mcore.parallel.protocols import data_parallel_builder
from mcore.parallel.state import ParallelState


class MeshTrainingRuntime:
    """Training on a ``ParallelState`` mesh: TP, SP, CP, PP (1F1B or interleaved), DP; the
    :class:`mcore.core.protocols.TrainingRuntime` of ``mcore train`` and ``mcore rl``."""

    def __init__(self, config: Any) -> None:
        self.parallel_state = ParallelState.from_config(config.parallel)
        vpp = config.parallel.virtual_pipeline_model_parallel_size
        self.vp_size = vpp if vpp and vpp > 1 else None
        self.sequence_parallel = config.parallel.sequence_parallel
        self.device = _device(config)
        self._schedule = get_forward_backward_func(self.parallel_state, vp_size=self.vp_size)
        self._metric_names: list[str] | None = None  # fixed at the first read_metrics

    def build(
        self,
        config: Any,
        model_config: Any,
        registries: Any,
        *,
        initialize: bool = True,
        on_model: Callable[[list[torch.nn.Module]], None] | None = None,
    ) -> tuple[list, Any, Any]:
        """Model chunks (one per virtual pipeline stage) for the schedule to run, their
        optimizer and LR schedule; model, data-parallel wrapper and optimizer come by name from
        the registries. A checkpoint, if any, is loaded into them afterwards, in place: pass
        ``initialize=False`` then, and no initial weights are drawn at all.

        The chunks are built on the ``meta`` device and materialised per rank
        (:func:`mcore.parallel.init.materialize`): each rank allocates and fills only what it
        holds. A wrapper that shards parameters (its registry entry sets
        ``accepts_meta_model = True``, as megatron-fsdp's does) is handed the meta model and
        only its shards are materialised; any other wrapper gets the materialised model.

        ``on_model(chunks)`` sees the bare meta chunks first and may change the list in place
        (add modules, wrap a chunk): what it adds is materialised, wrapped and optimised with
        the model (the ``mcore_on_model_built`` hook).
        """
        ps = self.parallel_state
        # Mixed precision is the data-parallel wrapper's to apply (train.bf16 / train.fp16):
        # DDP casts the model and the optimizer keeps fp32 main weights; a fully sharded
        # wrapper keeps the fp32 weights as its shards and computes on low-precision copies.
        wrap = data_parallel_builder(registries, config.train.data_parallel)
        seed = peek_seed()
        chunks = build_meta_chunks(config, model_config, registries, ps)
        if on_model is not None:
            on_model(chunks)
        # The weights' base seed: the builder's own (GPTModel keeps it), else the run's.
        seed = getattr(chunks[0], "init_seed", seed)
        shards_meta = getattr(wrap, "accepts_meta_model", False)
        if not shards_meta:
            materialize(chunks, device=self.device, seed=seed, initialize=initialize)
            # Derived buffers (rotary frequencies) are computed on the CPU at build time.
            chunks = [chunk.to(self.device) for chunk in chunks]
        if self.vp_size is None:
            self._wrapped = wrap(chunks[0], ps, config)
            chunks = [cast("torch.nn.Module", self._wrapped)]  # wrappers are modules
        else:
            # One data-parallel wrapper over all of this rank's chunks, so one optimizer steps
            # them; the schedule runs the chunks themselves, all micro-batches under no_sync,
            # and finalize_grads reduces every bucket at once (no overlap with backward yet).
            self._wrapped = wrap(torch.nn.ModuleList(chunks), ps, config)
        if shards_meta:
            materialize(chunks, device=self.device, seed=seed, initialize=initialize)
        train = config.train
        compile_regions(chunks, train.compile, train.compile_backend, self.device)
        self._chunks = chunks
        optimizer = registries.get("optimizer", config.optimizer.optimizer)(
            self._wrapped, ps, config
        )
        return chunks, optimizer, build_lr_scheduler(optimizer, config)

    def prepare_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's part of a micro-batch: with context parallelism, its two chunks of the
        sequence (tokens, labels, loss mask and positions alike)."""
        cp_group = self.parallel_state.cp_group
        if self.parallel_state.cp_size == 1:
            return batch
        return {
            k: split_for_context_parallel(v, dim=1, cp_group=cp_group) for k, v in batch.items()
        }

    def forward_backward(self, **kwargs: Any) -> list[Any]:
        """One step's forward and backward over its micro-batches (Megatron's arguments).

        Modules with auxiliary losses (an ``aux_loss_scale`` attribute, as MoE layers have) get
        the main loss's backward scale: 1 / micro-batches, times the fp16 loss scale.
        """
        scale = 1.0 / kwargs.get("num_microbatches", 1)
        grad_scale_func = kwargs.get("grad_scale_func")
        if grad_scale_func is not None:
            scale *= float(grad_scale_func(torch.ones(())))
        for module in self._modules_with("aux_loss_scale"):
            module.aux_loss_scale = scale
        if self.vp_size is None:
            return self._schedule(**kwargs)
        with self._wrapped.no_sync():
            return self._schedule(**kwargs)

    def finalize_grads(self, chunks: list) -> None:
        """Finish the data-parallel reduction, sum tied-embedding gradients over stages, and
        let modules with per-step work (``finalize_step(parallel_state)``, e.g. the MoE
        aux-loss-free bias update) do it."""
        with ranges.range("grad-sync"):
            self._wrapped.finish_grad_sync()
            allreduce_embedding_grads(chunks, self.parallel_state)
        for module in self._modules_with("finalize_step"):
            module.finalize_step(self.parallel_state)

    def read_metrics(self, chunks: list[torch.nn.Module]) -> dict[str, float]:
        """The statistics the modules of ``chunks`` gathered since the last read
        (``read_statistics()``, e.g. the MoE balancing losses and expert load), each the mean
        of its values over the steps in between and over every rank; known on every rank.

        Call it on every rank at the same steps, the log intervals: it reads the device and,
        when any module reports statistics, all-reduces them once over the world; the training
        step itself reads nothing back.
        """
        modules: list[Any] = [
            m for c in chunks for m in c.modules() if hasattr(type(m), "read_statistics")
        ]
        names = self._statistic_names(modules)
        if not names:
            return {}
        ps, index = self.parallel_state, {name: i for i, name in enumerate(names)}
        distributed = ps.world_size > 1 and dist.is_initialized()
        device = _collective_device(ps) if distributed else self.device
        # (sum, count) per name, in an order every rank shares: one collective merges them.
        packed = torch.zeros(len(names), 2, dtype=torch.float64, device=device)
        for module in modules:
            for name, (total, count) in module.read_statistics().items():
                if name not in index:
                    raise RuntimeError(
                        f"{type(module).__name__} reported the statistic {name!r} that its "
                        f"statistic_names() did not declare ({sorted(index)}); declare every "
                        "name it may report"
                    )
                packed[index[name], 0] += total.to(device, torch.float64)
                packed[index[name], 1] += count
        if distributed:
            dist.all_reduce(packed)
        rows = packed.tolist()  # the one host read
        return {name: s / c for name, (s, c) in zip(names, rows, strict=True) if c}

    def _statistic_names(self, modules: list[Any]) -> list[str]:
        """The names every rank's :meth:`read_metrics` packs, fixed at the first read: those the
        modules declare. Pipeline stages hold other layers, so with ``pp > 1`` the stages
        exchange their names once; otherwise every rank holds the same modules and nothing is
        exchanged (a model without statistics never runs a collective for them)."""
        if self._metric_names is None:
            names = {name for module in modules for name in module.statistic_names()}
            ps = self.parallel_state
            if ps.pp_size > 1 and dist.is_initialized():
                stages: list[list[str] | None] = [None] * ps.pp_size
                dist.all_gather_object(stages, sorted(names), group=ps.pp_group)
                names = {name for stage in stages for name in stage or []}
            self._metric_names = sorted(names)
        return self._metric_names

    def _modules_with(self, attribute: str) -> list[Any]:
        """This rank's modules whose class has ``attribute`` (a per-step hook, see
        :meth:`forward_backward` and :meth:`finalize_grads`)."""
        found = []
        for chunk in self._chunks:
            found += [m for m in chunk.modules() if hasattr(type(m), attribute)]
        return found

    def reduce_loss(self, losses: list[float]) -> float:
        """The step's loss: the mean over micro-batches (held by the last pipeline stage),
        averaged over data-parallel replicas, known on every rank."""
        ps = self.parallel_state
        local = sum(losses) / len(losses) if losses else 0.0
        if ps.world_size == 1:
            return local
        t = torch.tensor([local], dtype=torch.float64, device=_collective_device(ps))
        if ps.dp_cp_size > 1:
            dist.all_reduce(t, group=ps.dp_cp_group)
            t /= ps.dp_cp_size
        if ps.pp_size > 1:
            # Only the last stage computed a loss: sum over stages spreads it to every rank.
            if not ps.is_last_pp_stage:
                t.zero_()
            dist.all_reduce(t, group=ps.pp_group)
        return float(t.item())


def build_meta_chunks(
    config: Any, model_config: Any, registries: Any, parallel_state: ParallelState
) -> list[torch.nn.Module]:
    """This rank's model chunks (one per virtual pipeline stage), built by the ``model``
    registry's builder on the ``meta`` device: what ``mcore train`` materialises, and what
    ``mcore plan`` measures."""
    build_model = registries.get("model", model_config.name)
    vpp = config.parallel.virtual_pipeline_model_parallel_size
    vp_size = vpp if vpp and vpp > 1 else None
    with torch.device("meta"):
        return [
            build_model(
                model_config,
                parallel_state,
                sequence_parallel=config.parallel.sequence_parallel,
                sections=config,
                registries=registries,
                **({} if vp_size is None else {"vp_stage": c, "vp_size": vp_size}),
            )
            for c in range(vp_size or 1)
        ]


def _device(config: Any) -> torch.device:
    want = config.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collective_device(ps: ParallelState) -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
