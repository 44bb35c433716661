"""The knobs of ``fully_shard`` that are policies rather than layout: precision and offload."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class MixedPrecisionPolicy:
    """Compute in a low precision while the optimizer keeps the parameters' own (fp32) dtype.

    The sharded main weights, their gradients and the optimizer state keep the dtype the model
    was built in; only the gathered copies that modules compute with are cast.
    """

    param_dtype: torch.dtype | None = None
    """Dtype of the gathered parameters that forward and backward use (e.g. ``torch.bfloat16``);
    ``None`` computes in the parameters' own dtype."""
    reduce_dtype: torch.dtype | None = None
    """Dtype in which gradients are accumulated across micro-batches before the reduction and
    reduce-scattered/all-reduced; ``None`` means ``param_dtype``. ``torch.float32`` gives fp32
    gradient reduction and accumulation under bf16 compute."""
    output_dtype: torch.dtype | None = None
    """Cast floating-point outputs of the sharded module to this dtype; ``None`` leaves them."""
    cast_forward_inputs: bool = True
    """Cast floating-point tensor inputs of the sharded module to ``param_dtype``."""


@dataclass(frozen=True, kw_only=True)
class OffloadPolicy:
    """Keep the fp32 main weights, their gradients and so the optimizer state in CPU memory.

    The ordinary torch optimizer then steps on the CPU; each gather copies the updated shard to
    the device (cast to the compute dtype) and each reduction copies the gradient shard back.
    """

    pin_memory: bool = True
    """Pin the CPU buffers (only where CUDA is present) so host/device copies can overlap."""
