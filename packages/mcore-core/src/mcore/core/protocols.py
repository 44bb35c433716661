"""The extension points mcore-core owns: what ``mcore train`` and ``mcore rl`` run on.

The ``mcore_training_runtime`` hook returns a :class:`TrainingRuntime` (mcore-parallel provides
one), the ``mcore_checkpointer`` hook a :class:`Checkpointer` (mcore-ckpt provides one). The
core's loops call them only through the members below, so another package can supply either.
Protocols of registry kinds live in the packages that own those kinds (``mcore.moe.protocols``,
``mcore.ckpt.protocols``, ...); a :class:`~mcore.core.registry.Kind` names its protocol by
import path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch.distributed import ProcessGroup

    from mcore.core.config import Config
    from mcore.core.registry import Registries

__all__ = [
    "Checkpointer",
    "LRSchedule",
    "ParallelLayout",
    "ReadsMetrics",
    "TrainingOptimizer",
    "TrainingRuntime",
]


@runtime_checkable
class TrainingOptimizer(Protocol):
    """The optimizer a :class:`TrainingRuntime` builds (mcore-parallel's mixed-precision and
    distributed optimizers): what the loops and the checkpointer call on it."""

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The parameter groups with their hyper-parameters (``lr`` is logged every step)."""
        ...

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the loss scale before backward (fp16); unchanged otherwise."""
        ...

    def zero_grad(self) -> None: ...

    def step(self) -> tuple[bool, float]:
        """One update: ``(skipped, grad_norm)``; skipped when gradients were not finite."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class LRSchedule(Protocol):
    """The learning-rate schedule a :class:`TrainingRuntime` builds beside its optimizer."""

    def step(self, increment: int = 1) -> float:
        """Advance by ``increment`` optimizer steps; returns the new learning rate."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ParallelLayout(Protocol):
    """What the core reads of a runtime's parallel layout (mcore-parallel's ``ParallelState``
    has all of it, and much more that plugins may use)."""

    @property
    def rank(self) -> int:
        """This process's rank in the world."""
        ...

    @property
    def world_size(self) -> int: ...

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel replica: which share of each global batch it reads."""
        ...

    @property
    def dp_size(self) -> int: ...

    @property
    def tp_size(self) -> int:
        """Tensor-parallel size (the vocabulary is padded to split over it)."""
        ...

    @property
    def pp_size(self) -> int: ...

    @property
    def pp_group(self) -> ProcessGroup | None:
        """The pipeline-parallel group (``None`` in a single process)."""
        ...


@runtime_checkable
class TrainingRuntime(Protocol):
    """The parallel runtime ``mcore train`` and ``mcore rl`` run on (``mcore_training_runtime``).

    It owns everything parallel: the layout, how a model is built, wrapped for data
    parallelism and optimised, the pipeline schedule and the reductions between backward and
    the optimizer step. Every rank builds one and calls it at the same points.
    """

    @property
    def parallel_state(self) -> ParallelLayout:
        """The run's layout: ranks and process groups of every parallel dimension."""
        ...

    def build(
        self,
        config: Config,
        model_config: Any,
        registries: Registries,
        *,
        initialize: bool = True,
        on_model: Callable[[list[torch.nn.Module]], None] | None = None,
    ) -> tuple[list[torch.nn.Module], TrainingOptimizer, LRSchedule]:
        """This rank's model chunks (one per virtual pipeline stage), their optimizer and LR
        schedule: ``(chunks, optimizer, scheduler)``. ``initialize=False``: a checkpoint is
        about to be loaded, so the weights need storage but no initial values.
        ``on_model(chunks)`` sees the bare chunks before they are materialised and wrapped
        (the ``mcore_on_model_built`` hook) and may change the list in place."""
        ...

    def prepare_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's part of a micro-batch (e.g. its context-parallel chunks)."""
        ...

    def forward_backward(self, **kwargs: Any) -> list[Any]:
        """One step's forward and backward over its micro-batches, with Megatron's schedule
        arguments (``forward_step_func``, ``data_iterator``, ``model``, ``num_microbatches``,
        ``seq_length``, ``micro_batch_size``, ``forward_only``, ``grad_scale_func``); returns
        the last stage's per-micro-batch metrics."""
        ...

    def finalize_grads(self, chunks: list[torch.nn.Module]) -> None:
        """Finish the step's gradient reductions, before the optimizer steps."""
        ...

    def reduce_loss(self, losses: list[float]) -> float:
        """The step's value of ``losses`` (one per micro-batch, held by the last pipeline
        stage): their mean over micro-batches and data-parallel replicas, on every rank."""
        ...


@runtime_checkable
class ReadsMetrics(Protocol):
    """What a :class:`TrainingRuntime` may add: statistics its modules gather on the device."""

    def read_metrics(self, chunks: list[torch.nn.Module]) -> dict[str, float]:
        """The statistics gathered since the last read (e.g. MoE balancing losses), each
        averaged over steps and ranks. The loop calls it on every rank at log steps only."""
        ...


@runtime_checkable
class Checkpointer(Protocol):
    """What ``mcore train`` saves and resumes checkpoints with (``mcore_checkpointer``)."""

    def resume_path(self) -> Path | None:
        """The checkpoint :meth:`load` will read, if any; asked before the model is built, so
        that weights about to be loaded are not initialised."""
        ...

    def load(
        self,
        chunks: list[torch.nn.Module],
        optimizer: TrainingOptimizer,
        scheduler: LRSchedule | None,
    ) -> dict[str, int] | None:
        """Resume in place and return the loop's state (``{"iteration": n,
        "consumed_samples": m}``), or ``None`` when there is nothing to resume from.
        ``scheduler`` may be ``None`` (weights and optimizer only)."""
        ...

    def save(
        self,
        iteration: int,
        chunks: list[torch.nn.Module],
        optimizer: TrainingOptimizer,
        scheduler: LRSchedule,
        loop_state: dict[str, int],
    ) -> str | None:
        """Write a checkpoint of the whole training state; returns its published path, or
        ``None`` while an asynchronous save is still being written."""
        ...

    def poll(self) -> list[str]:
        """Paths of asynchronous saves published since the last call."""
        ...

    def finalize(self) -> list[str]:
        """Wait for saves in flight; the paths they published."""
        ...
