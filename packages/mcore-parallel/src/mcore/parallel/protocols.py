"""The extension point of mcore-parallel: data-parallel wrappers (the ``data_parallel`` kind).

A ``data_parallel`` registry entry wraps this rank's model for data parallelism as
``wrap(model, parallel_state, config)`` (:class:`DataParallelBuilder`); what it returns is a
:class:`DataParallelWrapper`, which the training runtime (:mod:`mcore.parallel.training`) runs,
hands to the optimizer builder and calls between backward and the optimizer step. The registry
refuses a wrapper class, or what a factory builds, that lacks a member of the protocol.
mcore-parallel's ``ddp`` and megatron-fsdp's ``megatron_fsdp`` are the two built in.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol, cast, runtime_checkable

if TYPE_CHECKING:
    from torch import nn

    from mcore.core.config import Config
    from mcore.core.registry import Registries
    from mcore.parallel.state import ParallelState

__all__ = ["DataParallelBuilder", "DataParallelWrapper", "data_parallel_builder"]


@runtime_checkable
class DataParallelWrapper(Protocol):
    """A model wrapped for data parallelism.

    A ``torch.nn.Module`` in practice: calling it runs the model, and its parameters are what
    the optimizer steps. Keep the model as ``.module`` and add no parameters of your own, and
    checkpoints and refits see the model's own names (:func:`mcore.parallel.sharding.unwrap`).
    Gradients of data-parallel replicas may be reduced as backward runs; :meth:`finish_grad_sync`
    completes them.
    """

    def no_sync(self) -> AbstractContextManager[None]:
        """Inside, backward passes accumulate gradients without reducing them (every
        micro-batch but the last of a step, when several model chunks share the wrapper)."""
        ...

    def finish_grad_sync(self) -> None:
        """Complete the step's gradient reduction after its last backward (every rank calls
        it once per step, before the optimizer steps)."""
        ...


class DataParallelBuilder(Protocol):
    """A ``data_parallel`` registry entry: wraps ``model`` as the run's ``config`` says.

    An entry with ``accepts_meta_model = True`` (an attribute of the function or class) is
    handed the model still on the ``meta`` device and materialises its own shards (a fully
    sharded wrapper); any other gets the model materialised on this rank's device.
    """

    def __call__(
        self, model: nn.Module, parallel_state: ParallelState, config: Config
    ) -> DataParallelWrapper: ...


def data_parallel_builder(registries: Registries, name: str) -> DataParallelBuilder:
    """The ``data_parallel`` registry's entry ``name``."""
    return cast("DataParallelBuilder", registries.get("data_parallel", name))


if TYPE_CHECKING:
    # The built-in entry conforms: the type checker verifies this assignment
    # (megatron-fsdp's adapter checks its own).
    from mcore.parallel.distributed.ddp import wrap_ddp

    _BUILDERS: list[DataParallelBuilder] = [wrap_ddp]
