"""Optimizers for mcore: fp32 main weights for any model precision, dynamic loss scaling,
global-norm clipping over every parallel group, CPU offload, the distributed (sharded)
optimizer, the learning-rate schedule, and the ``optimizer`` registry's builders."""

from mcore.parallel.optimizer.build import build_adam, build_optimizer, build_sgd
from mcore.parallel.optimizer.distributed import DistributedOptimizer
from mcore.parallel.optimizer.grad_norm import (
    clip_grads_,
    global_grad_norm,
    tp_sharded_params,
)
from mcore.parallel.optimizer.loss_scaler import DynamicLossScaler
from mcore.parallel.optimizer.mixed_precision import MixedPrecisionOptimizer, no_weight_decay
from mcore.parallel.optimizer.scheduler import OptimizerParamScheduler, build_lr_scheduler

__all__ = [
    "DistributedOptimizer",
    "DynamicLossScaler",
    "MixedPrecisionOptimizer",
    "OptimizerParamScheduler",
    "build_adam",
    "build_lr_scheduler",
    "build_optimizer",
    "build_sgd",
    "clip_grads_",
    "global_grad_norm",
    "no_weight_decay",
    "tp_sharded_params",
]
