"""The ``optimizer`` registry's entries: build a run's optimizer from its config.

Each entry is ``build(model, parallel_state, config) -> optimizer`` where ``model`` is the
(usually DDP-wrapped) model and ``config`` the run's ``Config``. The optimizer has ``step()``
returning ``(skipped, grad_norm)``, ``zero_grad()``, ``scale_loss(loss)`` and
``param_groups`` for the LR scheduler. ``optimizer.use_distributed_optimizer`` picks
:class:`DistributedOptimizer` over :class:`MixedPrecisionOptimizer`; ``train.fp16`` adds a
dynamic loss scaler; ``optimizer.optimizer_cpu_offload`` offloads
``optimizer_offload_fraction`` of the main weights and state to the CPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from mcore.core import McoreError
from mcore.parallel.optimizer.distributed import DistributedOptimizer
from mcore.parallel.optimizer.loss_scaler import DynamicLossScaler
from mcore.parallel.optimizer.mixed_precision import MakeOptimizer, MixedPrecisionOptimizer

if TYPE_CHECKING:
    from mcore.parallel.state import ParallelState


def build_optimizer(
    model: nn.Module, parallel_state: ParallelState, config: Any, make_optimizer: MakeOptimizer
) -> MixedPrecisionOptimizer:
    """Wrap the torch optimizer ``make_optimizer`` builds as the config's sections say."""
    opt = config.optimizer
    fp16 = "train" in config and config.train.fp16
    cls = DistributedOptimizer if opt.use_distributed_optimizer else MixedPrecisionOptimizer
    return cls(
        cast(Any, model),  # DistributedOptimizer checks that it is DistributedDataParallel
        parallel_state,
        make_optimizer,
        weight_decay=opt.weight_decay,
        clip_grad=opt.clip_grad,
        loss_scaler=DynamicLossScaler() if fp16 else None,
        offload_fraction=opt.optimizer_offload_fraction if opt.optimizer_cpu_offload else 0.0,
    )


_FUSED_DEVICES = ("cpu", "cuda")


def implementation(model: nn.Module, impl: str) -> dict[str, bool]:
    """The torch optimizer's ``fused`` / ``foreach`` arguments for ``optimizer.optimizer_impl``.

    ``auto`` fuses when every parameter of ``model`` is a plain floating-point tensor on a
    device torch's fused kernels cover; megatron-fsdp's ``DTensor`` parameters (whose shards the
    optimizer steps through views) get foreach: the fused kernels gave wrong steps there.
    """
    params = list(model.parameters())
    plain = bool(params) and all(
        type(p.data) is torch.Tensor
        and p.device.type in _FUSED_DEVICES
        and p.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
        for p in params
    )
    if impl == "fused" and not plain:
        raise McoreError(
            "optimizer.optimizer_impl = 'fused' needs plain CPU or CUDA parameters; this "
            "model's are sharded DTensors (megatron_fsdp): use foreach, for_loop or auto"
        )
    if impl == "auto":
        impl = "fused" if plain else "foreach"
    return {
        "fused": {"fused": True, "foreach": False},
        "foreach": {"fused": False, "foreach": True},
        "for_loop": {"fused": False, "foreach": False},
    }[impl]


def build_adam(
    model: nn.Module, parallel_state: ParallelState, config: Any
) -> MixedPrecisionOptimizer:
    """``adam``: AdamW (decoupled weight decay) with the ``[optimizer]`` section's betas, eps,
    lr and weight decay; biases and 1-D parameters are not decayed."""
    opt = config.optimizer
    kernels = implementation(model, getattr(opt, "optimizer_impl", "auto"))

    def make(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            groups,
            lr=opt.lr,
            betas=(opt.adam_beta1, opt.adam_beta2),
            eps=opt.adam_eps,
            weight_decay=opt.weight_decay,
            **kernels,
        )

    return build_optimizer(model, parallel_state, config, make)


def build_sgd(
    model: nn.Module, parallel_state: ParallelState, config: Any
) -> MixedPrecisionOptimizer:
    """``sgd``: SGD with momentum (``optimizer.sgd_momentum`` when the section has it, else
    Megatron's default 0.9) and L2 weight decay; biases and 1-D parameters are not decayed."""
    opt = config.optimizer
    momentum = getattr(opt, "sgd_momentum", 0.9)
    kernels = implementation(model, getattr(opt, "optimizer_impl", "auto"))

    def make(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            groups,
            lr=opt.lr,
            momentum=momentum,
            weight_decay=opt.weight_decay,
            **kernels,
        )

    return build_optimizer(model, parallel_state, config, make)
