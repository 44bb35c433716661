"""``MoELayer``: route, dispatch, run the experts, combine; registered as the ``moe`` MLP.

The router, dispatcher and experts come by name from their registries (``moe.router_type``,
``moe.token_dispatcher_type``), so a plugin swaps any of them. Between the router and the
dispatcher the layer applies what every router shares: router replay, capacity and token
dropping, padding for quantised GEMMs and the balancing losses, whose gradient joins backward
through :class:`~mcore.models.aux_loss.AuxLossAutoScaler`.

Per-step bookkeeping follows small protocols that ``mcore.parallel``'s training runtime calls
on any module that has them: ``aux_loss_scale`` (set to the main loss's backward scale),
``finalize_step(parallel_state)`` (after gradients are reduced: the aux-loss-free bias update),
and ``statistic_names()`` with ``read_statistics()`` for the logs.

Forward, backward and ``finalize_step`` read nothing back to the host (a read waits for the
device): the balancing losses and the expert load accumulate as device tensors, and only
``read_statistics``, called at log intervals, hands them over, still on the device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mcore.models import ModelContext
from mcore.models.aux_loss import AuxLossAutoScaler
from mcore.moe.experts import GroupedMLP, SharedExpertMLP
from mcore.moe.replay import ReplaySlot
from mcore.moe.routing import (
    apply_capacity,
    expert_capacity,
    global_token_counts,
    load_balancing_loss,
    pad_for_quantization,
    routing_map_from_topk,
    z_loss,
)

if TYPE_CHECKING:
    from mcore.moe.protocols import Router, TokenDispatcher
    from mcore.parallel import ParallelState


# Per-step expert loads wait at most this many steps for a log read; then they are reduced
# early (at a step count every rank shares), so memory stays bounded when logs are rare.
_MAX_UNREDUCED_STEPS = 64


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
        # Under TP without sequence parallelism every TP rank holds the same tokens (the
        # inference engine's flat batch): at inference each rank routes its share of them and
        # the outputs are gathered; training needs sequence parallelism (see forward).
        self.replicated_tokens = ps.tp_size > 1 and not ctx.sequence_parallel
        self.moe, self.parallel_state = moe, ps
        self.sequence_parallel = ctx.sequence_parallel
        self.layer_number = 0 if layer_number is None else layer_number
        self.num_experts = moe.num_experts
        nl = moe.num_experts // ps.ep_size
        local = list(range(ps.ep_rank * nl, (ps.ep_rank + 1) * nl))
        self.router: Router = ctx.build(
            "router", moe.router_type, ctx, moe, layer_number=self.layer_number
        )
        self.experts = GroupedMLP(ctx, moe, num_local_experts=nl)
        self.dispatcher: TokenDispatcher = ctx.build(
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
        if not self.replicated_tokens:
            out = self._routed(x)
        elif self.training and torch.is_grad_enabled():
            raise ValueError(
                "MoE layers under tensor parallelism need sequence parallelism "
                "(parallel.sequence_parallel = true) to train, so that every rank routes its "
                "own tokens"
            )
        else:
            out = self._routed_share(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

    def _routed_share(self, x: torch.Tensor) -> torch.Tensor:
        """The routed experts' output for tokens that every TP rank holds alike: each rank
        routes its contiguous share (the tokens padded to a multiple of TP) as under sequence
        parallelism, and the shares are gathered."""
        ps = self.parallel_state
        hidden = x.reshape(-1, x.shape[-1])
        n, tp = hidden.shape[0], ps.tp_size
        per = -(-n // tp)
        padded = F.pad(hidden, (0, 0, 0, per * tp - n))
        mine = padded[ps.tp_rank * per : (ps.tp_rank + 1) * per].unsqueeze(1)
        out = self._routed(mine).reshape(per, -1).contiguous()
        shares = [torch.empty_like(out) for _ in range(tp)]
        dist.all_gather(shares, out, group=ps.tp_group)
        return torch.cat(shares)[:n].view(x.shape)

    def _routed(self, x: torch.Tensor) -> torch.Tensor:
        """The routed experts' output for this rank's tokens ``[s, b, h]``."""
        shape = x.shape
        hidden = x.reshape(-1, shape[-1])
        routed = self.router(hidden, replay_indices=self.replay.next_indices())
        self.replay.record(routed.indices)
        if routed.routing_map is not None and routed.dense_probs is not None:
            probs, routing_map = routed.dense_probs, routed.routing_map
        else:
            probs, routing_map = routing_map_from_topk(
                routed.probs, routed.indices, self.num_experts
            )
        counts = routed.tokens_per_expert
        if self.training and torch.is_grad_enabled():
            probs = self._balancing_losses(
                probs, routed, routing_map, num_sequences=shape[1], counts=counts
            )
        moe = self.moe
        if moe.expert_capacity_factor is not None and self.drop_tokens:
            counts = None
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
            counts = None
        if self.training:
            self._count_tokens(routing_map, counts)
        dispatched = self.dispatcher.dispatch(hidden, probs, routing_map)
        out = self.experts(dispatched.tokens, dispatched.tokens_per_expert, dispatched.probs)
        out = self.dispatcher.combine(out, probs_applied=self.experts.applies_probs)
        return out.view(shape)

    def set_inference_mode(self, enabled: bool) -> None:
        """Serving routes every token to the experts it chose: capacity dropping (a training
        regulariser) would make a token's output depend on the rest of the batch."""
        self.drop_tokens = not enabled

    def _balancing_losses(self, probs, routed, routing_map, *, num_sequences: int, counts=None):
        """Attach the load-balancing and z-losses to ``probs`` (their gradient joins backward).
        ``counts``: ``routing_map``'s tokens per expert if the router counted them."""
        moe = self.moe
        total = probs.new_zeros(())
        kind = moe.router_load_balancing_type
        if kind != "none" and moe.aux_loss_coeff > 0:
            if routed.scores is None:
                raise ValueError(
                    f"router {moe.router_type!r} gives no scores over all experts, which the "
                    "load-balancing loss needs; set moe.router_load_balancing_type = 'none'"
                )
            n = None
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
            self._add_stat("load_balancing_loss", lb)
        if moe.z_loss_coeff:
            if routed.logits is None:
                raise ValueError(
                    f"router {moe.router_type!r} gives no logits, which the z-loss needs; "
                    "unset moe.z_loss_coeff"
                )
            zl = z_loss(routed.logits)
            total = total + moe.z_loss_coeff * zl
            self._add_stat("z_loss", zl)
        if total.requires_grad:
            probs = AuxLossAutoScaler.apply(probs, total, self.aux_loss_scale)
        return probs

    # -- per-step bookkeeping -----------------------------------------------------------------

    def _reset_stats(self) -> None:
        # Sums stay on the device of the activations; how many values each holds the host knows.
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._tokens_per_expert: torch.Tensor | None = None  # this step's, float64 [E]
        self._step_tokens = 0  # tokens routed this step: known from shapes alone
        self._unreduced_loads: list[torch.Tensor] = []  # per-step loads awaiting a log read

    def _add_stat(self, name: str, value: torch.Tensor, count: int = 1) -> None:
        value = value.detach().to(torch.float64)
        self._sums[name] = self._sums[name] + value if name in self._sums else value
        self._counts[name] = self._counts.get(name, 0) + count

    def _count_tokens(self, routing_map: torch.Tensor, counts: torch.Tensor | None = None) -> None:
        """Add this forward's tokens per expert (``counts``, if known, else from the map)."""
        if counts is None:
            counts = routing_map.sum(dim=0, dtype=torch.float64)
        else:
            counts = counts.to(torch.float64)
        previous = self._tokens_per_expert
        self._tokens_per_expert = counts if previous is None else previous + counts
        self._step_tokens += routing_map.shape[0]

    def _global_load(self, counts: torch.Tensor, ps: ParallelState) -> torch.Tensor:
        """``counts`` summed over the ranks that routed other tokens of the step (TP under
        sequence parallelism, data and context parallelism)."""
        if not dist.is_initialized():
            return counts
        groups = (ps.tp_group if self.sequence_parallel else None, ps.dp_cp_group)
        groups = [g for g in groups if g is not None and dist.get_world_size(g) > 1]
        if not groups:
            return counts
        reduced = counts.to(_collective_device())
        for group in groups:
            dist.all_reduce(reduced, group=group)
        return reduced.to(counts.device)

    def _reduce_loads(self) -> None:
        """Sum the waiting per-step expert loads over ranks (one collective) and record their
        imbalance."""
        if self._unreduced_loads:
            loads = self._global_load(torch.stack(self._unreduced_loads), self.parallel_state)
            self._unreduced_loads = []
            self._add_imbalance(loads)

    def _add_imbalance(self, loads: torch.Tensor) -> None:
        """Record max / mean tokens per expert of each row of ``loads`` ``[steps, E]``."""
        imbalance = loads.amax(dim=-1) / loads.mean(dim=-1)
        self._add_stat("expert_load_imbalance", imbalance.sum(), count=loads.shape[0])

    @torch.no_grad()
    def finalize_step(self, parallel_state: ParallelState | None = None) -> None:
        """After the step's backward: move the aux-loss-free bias toward balance, which needs
        the expert load summed over the ranks that routed other tokens (a collective of those
        ranks). Without the bias the load waits, unreduced, for :meth:`read_statistics`."""
        counts, routed = self._tokens_per_expert, self._step_tokens
        self._tokens_per_expert, self._step_tokens = None, 0
        if counts is None or routed == 0:
            return  # no training forward routed tokens this step
        bias = getattr(self.router, "expert_bias", None)
        if bias is None:
            self._unreduced_loads.append(counts)
            if len(self._unreduced_loads) == _MAX_UNREDUCED_STEPS:
                self._reduce_loads()
            return
        counts = self._global_load(counts, parallel_state or self.parallel_state)
        self._add_imbalance(counts.unsqueeze(0))
        # DeepSeek-V3: raise the bias of under-loaded experts, lower the over-loaded.
        step = torch.sign(counts.mean() - counts).to(bias.device, bias.dtype)
        bias.add_(self.moe.router_bias_update_rate * step)

    def statistic_names(self) -> list[str]:
        """Every name :meth:`read_statistics` may report, from the config alone, so that all
        ranks agree on them before any value is read."""
        moe = self.moe
        names = ["expert_load_imbalance"]
        if moe.router_load_balancing_type != "none" and moe.aux_loss_coeff > 0:
            names.append("load_balancing_loss")
        if moe.z_loss_coeff:
            names.append("z_loss")
        out = [f"moe/{name}" for name in names]
        if moe.per_layer_logging:
            out += [f"moe/layer{self.layer_number}/{name}" for name in names]
        return out

    @torch.no_grad()
    def read_statistics(self) -> dict[str, tuple[torch.Tensor, int]]:
        """The statistics since the last read as ``{name: (sum, count)}``, then cleared: each
        sum a 0-d float64 tensor on the device, each count how many values it holds.

        Call it on every rank at the same steps: the expert loads of steps without the bias
        update are summed over the ranks that routed other tokens here, in one collective.
        """
        self._reduce_loads()
        out: dict[str, tuple[torch.Tensor, int]] = {}
        for name, total in self._sums.items():
            count = self._counts[name]
            out[f"moe/{name}"] = (total, count)
            if self.moe.per_layer_logging:
                out[f"moe/layer{self.layer_number}/{name}"] = (total, count)
        self._sums, self._counts = {}, {}
        return out


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def moe_layer_spec(config):
    """The ``E`` symbol of a hybrid layer pattern: an MoE-MLP-only layer."""
    from mcore.models import LayerSpec

    return LayerSpec(attention=None, mlp="moe")
