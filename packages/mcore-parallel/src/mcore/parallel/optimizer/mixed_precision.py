"""``MixedPrecisionOptimizer``: a torch optimizer stepping fp32 main weights for a model of any
precision, with loss scaling, global-norm clipping and optional CPU offload.

The optimizer never touches the model's parameters directly. It keeps a list of *shards*: a
contiguous range of one parameter with its fp32 *main* copy, which the wrapped torch optimizer
updates. Here a shard is a whole parameter; the distributed optimizer, a subclass, makes shards
of the ranges this data-parallel rank owns. A step is:

1. finish DDP's gradient reduction, point each main's ``.grad`` at its gradient (a view when
   the gradient already is fp32 on the main's device, else an fp32 copy);
2. unscale (fp16), take the global norm over all parallel groups, skip the step if it is not
   finite (and let the loss scaler back off);
3. clip to ``clip_grad``, step the torch optimizer(s);
4. copy mains back into the model parameters (nothing to copy for fp32 parameters on the device:
   their mains are views of the parameters themselves).

With ``offload_fraction > 0`` the first that fraction of the main weights (by elements) lives
on the CPU with its optimizer state, in a second torch optimizer stepped there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from mcore.parallel.distributed.ddp import DistributedDataParallel
from mcore.parallel.grads import is_expert_parallel
from mcore.parallel.optimizer.grad_norm import (
    clip_grads_,
    global_grad_norm,
    scale_grads_,
    tp_sharded_params,
)
from mcore.parallel.optimizer.loss_scaler import DynamicLossScaler
from mcore.parallel.sharding import (
    Layout,
    ShardedTensor,
    flat_range_regions,
    held_region,
    is_dtensor,
    pieces,
)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from mcore.parallel.state import ParallelState

MakeOptimizer = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
"""Builds a torch optimizer from param groups, e.g. ``lambda g: torch.optim.AdamW(g, lr=1e-3)``."""


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Megatron's rule: biases and 1-D parameters (norm weights) are not weight-decayed."""
    return name == "bias" or name.endswith(".bias") or param.ndim == 1


@dataclass(eq=False)
class _Shard:
    """Elements ``[start, end)`` of a flattened model parameter, updated through ``main``."""

    name: str
    param: nn.Parameter
    start: int
    end: int
    counted: bool
    """Counted in the grad norm on this rank (see :mod:`mcore.parallel.optimizer.grad_norm`)."""
    decay: bool
    expert: bool = False
    """An expert parameter (see :func:`mcore.parallel.mark_expert_parallel`)."""
    main: torch.Tensor = field(init=False)
    """fp32 weights the torch optimizer updates: a view of the parameter when it is fp32 and
    on its device, otherwise a copy (``is_copy``)."""
    is_copy: bool = False
    offloaded: bool = False

    @property
    def numel(self) -> int:
        return self.end - self.start

    def model_view(self) -> torch.Tensor:
        return _local(self.param).detach().view(-1)[self.start : self.end]

    def grad_view(self, from_main_grad: bool) -> torch.Tensor | None:
        grad = self.param.main_grad if from_main_grad else self.param.grad  # pyright: ignore[reportAttributeAccessIssue]
        return None if grad is None else _local(grad).reshape(-1)[self.start : self.end]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a ``DTensor`` (a fully sharded parameter), else the tensor."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def _held_by_another_rank(param: torch.Tensor) -> bool:
    """A ``DTensor`` whose local piece another rank of its mesh holds too (a ``Replicate``
    dim where this rank is not the first): counted by that first rank alone."""
    if not is_dtensor(param):
        return False
    mesh = param.device_mesh
    return any(
        placement.is_replicate() and mesh.get_local_rank(dim) != 0
        for dim, placement in enumerate(param.placements)
    )


class MixedPrecisionOptimizer:
    """A torch optimizer over fp32 main weights of ``model`` (a plain module or a
    :class:`~mcore.parallel.distributed.DistributedDataParallel`).

    ``make_optimizer`` builds the torch optimizer from two param groups: parameters that are
    decayed with ``weight_decay`` and biases/1-D parameters, which are not. ``clip_grad > 0``
    clips by the global L2 norm. ``loss_scaler`` (fp16) scales the loss through
    :meth:`scale_loss` and the gradients back. ``offload_fraction`` of the main weights and their
    optimizer state live on the CPU.

    ``step()`` returns ``(skipped, grad_norm)``: ``skipped`` is true when the gradient was not
    finite (the step is skipped then, in every precision). Gradients are read from DDP's
    ``main_grad`` buffer, or from ``.grad`` for a plain module.

    Build it once the model is on its device (and wrapped): the main weights of fp32
    parameters are views of them.
    """

    def __init__(
        self,
        model: nn.Module,
        parallel_state: ParallelState,
        make_optimizer: MakeOptimizer,
        *,
        weight_decay: float = 0.0,
        clip_grad: float = 0.0,
        loss_scaler: DynamicLossScaler | None = None,
        offload_fraction: float = 0.0,
    ) -> None:
        if not 0.0 <= offload_fraction <= 1.0:
            raise ValueError(f"offload_fraction must lie in [0, 1], got {offload_fraction}")
        if clip_grad < 0:
            raise ValueError(f"clip_grad must be >= 0 (0 disables clipping), got {clip_grad}")
        self.ddp = model if isinstance(model, DistributedDataParallel) else None
        self.module = self.ddp.module if self.ddp is not None else _unwrapped(model)
        self.parallel_state = parallel_state
        self.clip_grad = clip_grad
        self.loss_scaler = loss_scaler
        self._tp_sharded = tp_sharded_params(self.module)
        self._shards = self._make_shards()
        # Fully sharded data parallel (parameters are DTensors, e.g. megatron_fsdp): each
        # data-parallel rank holds different pieces of the gradients, as under the distributed
        # optimizer. Every rank of a run wraps its model alike, so all agree on this.
        self._dp_sharded = any(is_dtensor(s.param) for s in self._shards)
        self._any_experts = _any_rank_has_experts(self._shards, parallel_state)
        self._make_mains(offload_fraction)
        self._optimizers = self._make_optimizers(make_optimizer, weight_decay, offload_fraction)

    # -- layout ---------------------------------------------------------------------------------

    def _shard(self, name: str, param: nn.Parameter, start: int, end: int) -> _Shard:
        ps = self.parallel_state
        # Count each gradient element once over the world: a TP-replicated parameter on TP rank
        # 0 only, a tied-embedding copy (one on the first and one on the last pipeline stage,
        # with equal gradients after allreduce_embedding_grads) on the first stage only.
        # Expert weights are split over EP and ETP, never replicated over TP: each counts.
        expert = is_expert_parallel(param)
        tp_duplicate = not expert and id(param) not in self._tp_sharded and ps.tp_rank > 0
        pp_duplicate = getattr(param, "shared_embedding", False) and not ps.is_first_pp_stage
        dp_duplicate = _held_by_another_rank(param)
        return _Shard(
            name=name,
            param=param,
            start=start,
            end=end,
            counted=not (tp_duplicate or pp_duplicate or dp_duplicate),
            decay=not no_weight_decay(name, param),
            expert=expert,
        )

    def _make_shards(self) -> list[_Shard]:
        """One shard per trainable parameter."""
        return [
            self._shard(name, p, 0, _local(p).numel())
            for name, p in self.module.named_parameters()
            if p.requires_grad
        ]

    def _make_mains(self, offload_fraction: float) -> None:
        budget, used = offload_fraction * sum(s.numel for s in self._shards), 0
        for s in self._shards:
            s.offloaded = offload_fraction > 0 and used < budget
            used += s.numel if s.offloaded else 0
            if not _local(s.param).is_contiguous():
                raise ValueError(
                    f"parameter {s.name!r} is not contiguous: the optimizer keeps flat views of "
                    "parameters; make it contiguous before building the optimizer"
                )
            flat = s.model_view()
            if s.param.dtype == torch.float32 and not s.offloaded:
                s.main = flat  # updated in place: the parameter is its own main weight
                continue
            device = torch.device("cpu") if s.offloaded else flat.device
            main = flat.to(device=device, dtype=torch.float32, copy=True)
            if s.offloaded and flat.is_cuda:
                main = main.pin_memory()  # faster copies to and from the GPU
            s.main, s.is_copy = main, True

    def _make_optimizers(
        self, make_optimizer: MakeOptimizer, weight_decay: float, offload_fraction: float
    ) -> list[torch.optim.Optimizer]:
        # The same two groups in each optimizer (possibly empty), so that every rank has the
        # same param_groups for the LR scheduler and for checkpoints.
        parts = []
        if offload_fraction < 1.0:
            parts.append([s for s in self._shards if not s.offloaded])
        if offload_fraction > 0.0:
            parts.append([s for s in self._shards if s.offloaded])
        return [
            make_optimizer(
                [
                    {"params": [s.main for s in part if s.decay], "weight_decay": weight_decay},
                    {"params": [s.main for s in part if not s.decay], "weight_decay": 0.0},
                ]
            )
            for part in parts
        ]

    def _norm_groups(self) -> list[ProcessGroup | None]:
        """Groups over which the counted parts of the gradient differ (see grad_norm); fully
        sharded parameters also differ over dp_cp (their replicas count zero there)."""
        ps = self.parallel_state
        dp = [ps.dp_cp_group] if self._dp_sharded else []
        return [*dp, ps.tp_group, ps.pp_group]

    def _expert_norm_groups(self) -> list[ProcessGroup | None]:
        """The same for expert parameters, which differ over EP, ETP and stages (and over
        edp when fully sharded)."""
        ps = self.parallel_state
        edp = [ps.edp_group] if self._dp_sharded else []
        return [*edp, ps.ep_group, ps.etp_group, ps.pp_group]

    def _grad_norm(self) -> float:
        """The global norm: dense and expert parts summed over their own groups. Every rank
        runs both reductions, also where a stage holds no experts, so collectives match. A
        parameter without a gradient this step (unused by the forward) counts as zero."""
        grads = [(s.expert, s.main.grad) for s in self._shards if s.counted]
        dense = [g for is_expert, g in grads if g is not None and not is_expert]
        expert = [g for is_expert, g in grads if g is not None and is_expert]
        total = global_grad_norm(dense, self._norm_groups()) ** 2
        if self._any_experts:
            total = total + global_grad_norm(expert, self._expert_norm_groups()).to(total) ** 2
        return float(total.sqrt())

    # -- the step -------------------------------------------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Every param group of the wrapped optimizer(s); an LR scheduler sets ``lr`` here."""
        return [group for opt in self._optimizers for group in opt.param_groups]

    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.scale if self.loss_scaler is not None else 1.0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the loss scale: call backward on this (a no-op without a scaler)."""
        return loss * self.loss_scaler.scale if self.loss_scaler is not None else loss

    def zero_grad(self) -> None:
        """Clear the gradients (DDP's buffer, or every parameter's ``.grad``)."""
        if self.ddp is not None:
            self.ddp.zero_grad_buffer()
        else:
            for s in self._shards:
                s.param.grad = None

    @torch.no_grad()
    def step(self) -> tuple[bool, float]:
        """Update the model from its gradients; returns ``(skipped, grad_norm)``."""
        if self.ddp is not None:
            self.ddp.finish_grad_sync()
        grads = self._load_main_grads()
        if self.loss_scaler is not None:
            scale_grads_(grads, 1.0 / self.loss_scaler.scale)
        grad_norm = self._grad_norm()
        found_inf = not math.isfinite(grad_norm)
        if self.loss_scaler is not None:
            self.loss_scaler.update(found_inf)
        if not found_inf:
            if self.clip_grad > 0:
                clip_grads_(grads, self.clip_grad, grad_norm)
            for opt in self._optimizers:
                opt.step()
            self._publish_params()
        for s in self._shards:
            s.main.grad = None  # release fp32 copies until the next step
        return found_inf, grad_norm

    def _load_main_grads(self) -> list[torch.Tensor]:
        from_main_grad = self.ddp is not None
        grads = []
        for s in self._shards:
            grad = s.grad_view(from_main_grad)
            # .to() returns the view itself when dtype and device already match: no copy.
            s.main.grad = None if grad is None else grad.to(s.main.device, torch.float32)
            if s.main.grad is not None:
                grads.append(s.main.grad)
        return grads

    def _publish_params(self) -> None:
        """Write updated main weights into the model parameters."""
        for s in self._shards:
            if s.is_copy:
                s.model_view().copy_(s.main)

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's optimizer state: the torch optimizers', the fp32 main weights that are
        copies (the model holds them only rounded), and the loss scaler's."""
        return {
            "optimizers": [opt.state_dict() for opt in self._optimizers],
            "main_params": [s.main.detach().clone() for s in self._shards if s.is_copy],
            "loss_scaler": None if self.loss_scaler is None else self.loss_scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` of the same layout on the same rank."""
        copies = [s for s in self._shards if s.is_copy]
        mains: Sequence[torch.Tensor] = state["main_params"]
        if len(mains) != len(copies) or len(state["optimizers"]) != len(self._optimizers):
            raise ValueError(
                "optimizer state does not match this optimizer's layout: it was saved with a "
                "different model, parallel layout or offload fraction"
            )
        with torch.no_grad():
            for s, main in zip(copies, mains, strict=True):
                s.main.copy_(main)
            self._publish_params()
        for opt, opt_state in zip(self._optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
        if self.loss_scaler is not None and state["loss_scaler"] is not None:
            self.loss_scaler.load_state_dict(state["loss_scaler"])

    # -- sharded checkpoints (layout-free; see mcore.parallel.sharding) --------------------------

    def sharded_state_dict(
        self, layouts: Mapping[int, tuple[str, Layout]], *, for_load: bool = False
    ) -> dict[str, ShardedTensor | torch.Tensor]:
        """This rank's part of the global training state that the optimizer holds.

        - ``model.<key>``: the weights this rank updates, read from the fp32 main weights (for
          a parameter that is its own main weight, that is the parameter). Saving takes them
          from here, so the checkpoint keeps fp32 weights whatever the model computes in.
          For loading (``for_load``) only main weights that are copies are listed: the model
          loads its own parameters, and the copies must not be rounded through them.
        - ``optimizer.state.<key>.<name>``: the torch optimizer's per-parameter state
          (AdamW's ``exp_avg``, ``exp_avg_sq``) shaped like the parameter; scalars such as
          ``step`` as 0-d tensors.

        ``layouts`` maps ``id(param)`` to its checkpoint key and :class:`Layout`
        (:func:`mcore.parallel.sharding.named_layouts`). For loading, missing state is first
        created (as the first step would), so there is somewhere to load it into.
        """
        if for_load:
            self._materialize_state()
        out: dict[str, ShardedTensor | torch.Tensor] = {}
        for s in self._shards:
            key, layout = layouts[id(s.param)]
            local, base = held_region(s.param)
            shape = tuple(local.shape)

            def add(name: str, flat: torch.Tensor, s=s, layout=layout, shape=shape, base=base):
                regions = flat_range_regions(flat.reshape(-1), shape, s.start, base)
                new = ShardedTensor(name, layout.global_shape, flat.dtype)
                entry = cast("ShardedTensor", out.setdefault(name, new))
                entry.pieces += pieces(layout, regions)

            if s.is_copy or not for_load:
                add(f"model.{key}", s.main)
            for name, value in self._state_of(s.main).items():
                if not isinstance(value, torch.Tensor):
                    continue
                state_key = f"optimizer.state.{key}.{name}"
                if value.dim() == 0:
                    out[state_key] = value
                elif value.numel() == s.numel:
                    add(state_key, value)
        return out

    def finish_load(self) -> None:
        """After loading main weights and state in place: write the mains into the model (and,
        under the distributed optimizer, all-gather them)."""
        with torch.no_grad():
            self._publish_params()

    def _state_of(self, main: torch.Tensor) -> dict[str, Any]:
        for opt in self._optimizers:
            if main in opt.state:
                return opt.state[main]
        return {}

    @torch.no_grad()
    def _materialize_state(self) -> None:
        """Create the torch optimizers' state for every main weight lacking it, by one step
        with zero gradients and a zero learning rate (changes no weight)."""
        for opt in self._optimizers:
            missing = [p for g in opt.param_groups for p in g["params"] if p not in opt.state]
            if not missing:
                continue
            lrs = [g["lr"] for g in opt.param_groups]
            others = [p for g in opt.param_groups for p in g["params"] if p in opt.state]
            held = [(p, p.grad) for p in others]
            for p in others:
                p.grad = None
            for g in opt.param_groups:
                g["lr"] = 0.0
            for p in missing:
                p.grad = torch.zeros_like(p)
            opt.step()
            for g, lr in zip(opt.param_groups, lrs, strict=True):
                g["lr"] = lr
            for p in missing:
                p.grad = None
            for p, grad in held:
                p.grad = grad


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside a data-parallel wrapper that keeps it as ``.module`` and adds no
    parameters of its own (parameter names then match the model's), else ``model``."""
    inner = getattr(model, "module", None)
    if isinstance(inner, nn.Module) and sum(1 for _ in model.parameters()) == sum(
        1 for _ in inner.parameters()
    ):
        return inner
    return model


def _any_rank_has_experts(shards: Sequence[_Shard], parallel_state: ParallelState) -> bool:
    """Whether any rank holds expert parameters (a stage may hold none while others do)."""
    import torch.distributed as dist

    local = any(s.expert for s in shards)
    if parallel_state.world_size == 1 or not dist.is_initialized():
        return local
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([float(local)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
