"""``MoELayer``: route, dispatch, run the experts, combine; registered as the ``moe`` MLP.

The router, dispatcher and experts come by name from their registries (``moe.router_type``,
``moe.token_dispatcher_type``), so a plugin swaps any of them. Between the router and the
dispatcher the layer applies what every router shares: router replay, capacity and token
dropping, padding for quantised GEMMs and the balancing losses, whose gradient joins backward
through :class:`~mcore.moe.routing.AuxLossAutoScaler`.

Per-step bookkeeping follows two small protocols that ``mcore.parallel``'s training runtime
calls on any module that has them: ``aux_loss_scale`` (set to the main loss's backward scale),
``finalize_step(parallel_state)`` (after gradients are reduced: the aux-loss-free bias update)
and ``step_metrics()`` (``{name: (sum, count)}`` for the logs).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mcore.models import ModelContext
from mcore.moe.experts import GroupedMLP, SharedExpertMLP
from mcore.moe.replay import ReplaySlot
from mcore.moe.routing import (
    AuxLossAutoScaler,
    apply_capacity,
    expert_capacity,
    global_token_counts,
    load_balancing_loss,
    pad_for_quantization,
    routing_map_from_topk,
    z_loss,
)


class MoELayer(torch.nn.Module):
    """A mixture-of-experts MLP: ``[s, b, h] -> [s, b, h]`` (``s / tp`` under sequence
    parallelism, each rank routing its own tokens)."""

    aux_loss_scale: float = 1.0
    """Backward scale of the balancing losses; the training runtime sets it per step."""
    drop_tokens: bool = True
    """Apply ``expert_capacity_factor`` (drop tokens over capacity); off at inference."""

    def __init__(self, ctx: ModelContext, *, layer_number: int | None = None) -> None:
        super().__init__()
        moe = ctx.section("moe")
        ps = ctx.parallel_state
        if moe.num_experts is None:
            raise ValueError("the moe MLP needs moe.num_experts to be set")
        ps.check_divisible(num_experts=moe.num_experts)
        if ps.tp_size > 1 and not ctx.sequence_parallel:
            raise ValueError(
                "MoE layers under tensor parallelism need sequence parallelism "
                "(parallel.sequence_parallel = true), so that every rank routes its own tokens"
            )
        self.moe, self.parallel_state = moe, ps
        self.sequence_parallel = ctx.sequence_parallel
        self.layer_number = 0 if layer_number is None else layer_number
        self.num_experts = moe.num_experts
        nl = moe.num_experts // ps.ep_size
        local = list(range(ps.ep_rank * nl, (ps.ep_rank + 1) * nl))
        self.router = ctx.build("router", moe.router_type, ctx, moe, layer_number=self.layer_number)
        self.experts = GroupedMLP(ctx, moe, num_local_experts=nl)
        self.dispatcher = ctx.build(
            "token_dispatcher",
            moe.token_dispatcher_type,
            ctx,
            moe,
            num_local_experts=nl,
            local_expert_indices=local,
        )
        self.shared_experts = (
            SharedExpertMLP(ctx, moe) if moe.shared_expert_intermediate_size else None
        )
        self.replay = ReplaySlot()
        self._reset_stats()

    # -- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        hidden = x.reshape(-1, shape[-1])
        routed = self.router(hidden, replay_indices=self.replay.next_indices())
        self.replay.record(routed.indices)
        probs, routing_map = routing_map_from_topk(routed.probs, routed.indices, self.num_experts)
        if self.training and torch.is_grad_enabled():
            probs = self._balancing_losses(probs, routed, routing_map, num_sequences=shape[1])
        moe = self.moe
        if moe.expert_capacity_factor is not None and self.drop_tokens:
            capacity = expert_capacity(
                hidden.shape[0], moe.router_topk, self.num_experts, moe.expert_capacity_factor
            )
            probs, routing_map = apply_capacity(
                probs,
                routing_map,
                capacity,
                policy=moe.token_drop_policy,
                pad_to_capacity=moe.pad_expert_input_to_capacity,
            )
        if moe.padding_alignment is not None:
            probs, routing_map = pad_for_quantization(probs, routing_map, moe.padding_alignment)
        if self.training:
            self._tokens_per_expert += routing_map.sum(dim=0).detach().to("cpu", torch.float64)
        dispatched = self.dispatcher.dispatch(hidden, probs, routing_map)
        out = self.experts(dispatched.tokens, dispatched.tokens_per_expert, dispatched.probs)
        out = self.dispatcher.combine(out, probs_applied=self.experts.applies_probs)
        out = out.view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

    def set_inference_mode(self, enabled: bool) -> None:
        """Serving routes every token to the experts it chose: capacity dropping (a training
        regulariser) would make a token's output depend on the rest of the batch."""
        self.drop_tokens = not enabled

    def _balancing_losses(self, probs, routed, routing_map, *, num_sequences: int):
        """Attach the load-balancing and z-losses to ``probs`` (their gradient joins backward)."""
        moe = self.moe
        total = probs.new_zeros(())
        kind = moe.router_load_balancing_type
        if kind != "none" and moe.aux_loss_coeff > 0:
            if routed.scores is None:
                raise ValueError(
                    f"router {moe.router_type!r} gives no scores over all experts, which the "
                    "load-balancing loss needs; set moe.router_load_balancing_type = 'none'"
                )
            counts = n = None
            if kind == "global_aux_loss":
                ps = self.parallel_state
                groups = [ps.tp_group if self.sequence_parallel else None, ps.dp_cp_group]
                counts, n = global_token_counts(routing_map, groups)
            lb = load_balancing_loss(
                routed.scores,
                routing_map,
                moe.router_topk,
                num_sequences=num_sequences,
                per_sequence=kind == "seq_aux_loss",
                token_counts=counts,
                total_tokens=n,
            )
            total = total + moe.aux_loss_coeff * lb
            self._add_stat("load_balancing_loss", float(lb.detach()))
        if moe.z_loss_coeff:
            if routed.logits is None:
                raise ValueError(
                    f"router {moe.router_type!r} gives no logits, which the z-loss needs; "
                    "unset moe.z_loss_coeff"
                )
            zl = z_loss(routed.logits)
            total = total + moe.z_loss_coeff * zl
            self._add_stat("z_loss", float(zl.detach()))
        if total.requires_grad:
            probs = AuxLossAutoScaler.apply(probs, total, self.aux_loss_scale)
        return probs

    # -- per-step bookkeeping -----------------------------------------------------------------

    def _reset_stats(self) -> None:
        self._stats: dict[str, list[float]] = {}
        self._tokens_per_expert = torch.zeros(self.num_experts, dtype=torch.float64)

    def _add_stat(self, name: str, value: float) -> None:
        entry = self._stats.setdefault(name, [0.0, 0.0])
        entry[0] += value
        entry[1] += 1

    @torch.no_grad()
    def finalize_step(self, parallel_state=None) -> None:
        """After the step's backward: sum the expert load over the ranks that routed other
        tokens, move the aux-loss-free bias toward balance and record the load imbalance."""
        ps = parallel_state or self.parallel_state
        counts = self._tokens_per_expert
        if dist.is_initialized():
            device = _collective_device()
            counts = counts.to(device)
            for group in (ps.tp_group if self.sequence_parallel else None, ps.dp_cp_group):
                if group is not None and dist.get_world_size(group) > 1:
                    dist.all_reduce(counts, group=group)
            counts = counts.cpu()
        if counts.sum() > 0:
            self._add_stat("expert_load_imbalance", float(counts.max() / counts.mean()))
            bias = getattr(self.router, "expert_bias", None)
            if bias is not None:
                # DeepSeek-V3: raise the bias of under-loaded experts, lower the over-loaded.
                step = torch.sign(counts.mean() - counts).to(bias.device, bias.dtype)
                bias.add_(self.moe.router_bias_update_rate * step)
        self._last_counts = counts
        self._tokens_per_expert = torch.zeros_like(self._tokens_per_expert)

    def step_metrics(self) -> dict[str, tuple[float, float]]:
        """This step's statistics as ``{name: (sum, count)}``, cleared after reading."""
        out: dict[str, tuple[float, float]] = {}
        for name, (total, count) in self._stats.items():
            out[f"moe/{name}"] = (total, count)
            if self.moe.per_layer_logging:
                out[f"moe/layer{self.layer_number}/{name}"] = (total, count)
        self._stats = {}
        return out


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def moe_layer_spec(config):
    """The ``E`` symbol of a hybrid layer pattern: an MoE-MLP-only layer."""
    from mcore.models import LayerSpec

    return LayerSpec(attention=None, mlp="moe")
