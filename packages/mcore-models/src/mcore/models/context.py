"""What every module of a model is built from: the config, the parallel layout, the registries."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mcore.models.config import TransformerConfig
from mcore.parallel import ParallelState, mark_tp_partial_grad

__all__ = ["ModelContext", "mark_tp_partial_grad"]


@dataclass
class ModelContext:
    """Passed to every registered module builder: ``Builder(ctx, ...)``."""

    config: TransformerConfig
    parallel_state: ParallelState = field(default_factory=ParallelState)
    sequence_parallel: bool = False
    """Shard activations along the sequence between TP regions (only when TP > 1)."""
    registries: Any = None
    sections: dict[str, Any] = field(default_factory=dict)
    """Config sections of other packages the modules may read (e.g. ``moe``), by name."""

    def __post_init__(self) -> None:
        if self.parallel_state.tp_size == 1:
            self.sequence_parallel = False
        if self.registries is None:
            from mcore.core import get_plugin_manager

            self.registries = get_plugin_manager().registries

    @property
    def tp_group(self) -> Any:
        return self.parallel_state.tp_group

    def section(self, name: str) -> Any:
        """The ``[name]`` config section a module needs; a clear error when it was not given."""
        if name not in self.sections:
            raise ValueError(
                f"this model needs the [{name}] config section, but the model was built "
                f"without it: pass sections={{'{name}': ...}} to the model (mcore train does)"
            )
        return self.sections[name]

    def init_method(self) -> Callable[[torch.Tensor], Any]:
        std = self.config.init_method_std
        return lambda t: torch.nn.init.normal_(t, mean=0.0, std=std)

    def output_init_method(self) -> Callable[[torch.Tensor], Any]:
        # Residual-branch outputs are scaled down with depth (GPT-2 / Megatron), so the residual
        # stream's variance does not grow with the number of layers.
        std = self.config.init_method_std / math.sqrt(2.0 * self.config.num_layers)
        return lambda t: torch.nn.init.normal_(t, mean=0.0, std=std)

    def build(self, kind: str, name: str, *args: Any, **kwargs: Any) -> Any:
        """Build the ``kind`` component registered as ``name`` (refused when it lacks a member
        of the kind's protocol, e.g. :class:`mcore.moe.protocols.Router`)."""
        return self.registries[kind].build(name, *args, **kwargs)

    def norm(self, size: int) -> torch.nn.Module:
        cfg = self.config
        if not cfg.layernorm_zero_centered_gamma:
            return self.build("norm", cfg.normalization, size, cfg.norm_epsilon)
        try:
            return self.build(
                "norm", cfg.normalization, size, cfg.norm_epsilon, zero_centered_gamma=True
            )
        except TypeError as error:
            raise ValueError(
                f"model.layernorm_zero_centered_gamma is set, but norm {cfg.normalization!r} "
                f"takes no zero_centered_gamma argument ({error})"
            ) from error
