"""Multi-token prediction (DeepSeek-V3's MTP): extra depths that predict tokens further ahead.

Depth ``k`` (1-based) at position ``t`` combines what depth ``k - 1`` knew at ``t`` (the main
model's final-normed hidden state for ``k = 1``) with the embedding of token ``t + k``, and
predicts token ``t + k + 1``::

    h_k = block_k(eh_proj([enorm(embed(token[t + k])), hnorm(h_{k-1})]))
    h_k = final_layernorm_k(h_k)        # passed on to depth k + 1
    logits_k = output_layer(h_k)        # the main model's output layer and embedding, shared

``block_k`` is one transformer layer with the spec of the main stack's last layer (dense or
MoE), or the layers of the ``k``-th ``/`` block of a hybrid pattern. The depths live on the last
pipeline stage; without the embedding there, the stage keeps a copy of the word embeddings (as
tied output embeddings do), summed with the first stage's by ``allreduce_embedding_grads``.

In training the depths' losses, each the masked mean cross entropy of its shifted targets,
are averaged over depths and scaled by ``mtp_loss_scaling_factor``; they reach the gradients
through :class:`~mcore.models.aux_loss.AuxLossAutoScaler` without changing the loss the model
returns (the LM loss),
and are logged per depth (``mtp_1_loss``, ...) at log intervals, read from the device then.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mcore.models.aux_loss import AuxLossAutoScaler
from mcore.models.context import ModelContext, mark_tp_partial_grad
from mcore.models.layer import LayerSpec, TransformerLayer
from mcore.models.packing import PackedSeqParams
from mcore.parallel.init import set_init

__all__ = ["MultiTokenPrediction", "MultiTokenPredictionLayer", "mtp_targets"]


def mtp_targets(tensor: torch.Tensor, depth: int, fill: int | float = 0) -> torch.Tensor:
    """``tensor`` ``[b, s]`` moved ``depth`` places to the left along the sequence (position
    ``t`` gets ``t + depth``), the last ``depth`` positions filled with ``fill``."""
    out = torch.roll(tensor, -depth, dims=1)
    out[:, tensor.shape[1] - depth :] = fill
    return out


Shift = Callable[[torch.Tensor, int, int | float], torch.Tensor]
"""``shift(tensor [b, s], depth, fill)``: :func:`mtp_targets` of the whole sequence, as this
rank holds it (under context parallelism the model gathers the shards, shifts and splits)."""


def _valid_positions(
    like: torch.Tensor, depth: int, packed: PackedSeqParams | None, shift: Shift
) -> torch.Tensor:
    """``[b, s]`` True where token ``t + depth`` exists and belongs to ``t``'s sequence."""
    valid = shift(torch.ones_like(like, dtype=torch.long), depth, 0).bool()
    if packed is not None:
        seg = packed.segment_ids.to(like.device)
        valid = valid & (shift(seg, depth, -1) == seg) & (seg >= 0)
    return valid


class MultiTokenPredictionLayer(torch.nn.Module):
    """One MTP depth: the two input norms, the projection, its layers and its output norm."""

    def __init__(self, ctx: ModelContext, specs: list[LayerSpec], first_layer_number: int) -> None:
        super().__init__()
        hidden = ctx.config.hidden_size
        self.enorm = ctx.norm(hidden)
        self.hnorm = ctx.norm(hidden)
        # Replicated over TP (2h x h): the sequence-parallel shards arrive with every channel,
        # and splitting the projection would need an all-to-all on both sides of it.
        self.eh_proj = torch.nn.Linear(2 * hidden, hidden, bias=False)
        set_init(self.eh_proj.weight, ctx.init_method())
        self.block = torch.nn.ModuleList(
            TransformerLayer(ctx, spec, layer_number=first_layer_number + j)
            for j, spec in enumerate(specs)
        )
        self.final_layernorm = ctx.norm(hidden)
        if ctx.sequence_parallel:
            # Each TP rank sees only its sequence shard: these gradients are partial over TP.
            mark_tp_partial_grad(
                self.eh_proj.weight,
                *self.enorm.parameters(),
                *self.hnorm.parameters(),
                *self.final_layernorm.parameters(),
            )

    def forward(
        self,
        embedded: torch.Tensor,
        hidden: torch.Tensor,
        run_layer: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """``embedded`` (the shifted tokens) and ``hidden`` (the previous depth's) ``[s, b, h]``
        → this depth's final-normed hidden states ``[s, b, h]``."""
        x = self.eh_proj(torch.cat([self.enorm(embedded), self.hnorm(hidden)], dim=-1))
        for layer in self.block:
            x = run_layer(layer, x)
        return self.final_layernorm(x)


class MultiTokenPrediction(torch.nn.Module):
    """The MTP depths of a model, on its last pipeline stage (see the module docstring)."""

    aux_loss_scale: float = 1.0
    """Backward scale of the LM loss; the training runtime sets it before each step."""

    def __init__(
        self, ctx: ModelContext, depth_specs: list[list[LayerSpec]], first_layer_number: int
    ) -> None:
        super().__init__()
        layers, number = [], first_layer_number
        for specs in depth_specs:
            layers.append(MultiTokenPredictionLayer(ctx, specs, number))
            number += len(specs)
        self.layers = torch.nn.ModuleList(layers)
        self.loss_scaling_factor = ctx.config.mtp_loss_factor
        # Per depth: the sum of its micro-batch losses and their count, since the last read.
        self._totals: torch.Tensor | None = None
        self._count = 0

    @property
    def depth(self) -> int:
        return len(self.layers)

    def hidden_states(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        embed: Callable[[torch.Tensor], torch.Tensor],
        run_layer: Callable[[int, TransformerLayer, torch.Tensor], torch.Tensor],
        shift: Shift = mtp_targets,
    ) -> list[torch.Tensor]:
        """Each depth's final-normed hidden states ``[s, b, h]``, from the main model's
        ``hidden`` and the tokens ``input_ids`` ``[b, s]``. ``embed(ids [b, s])`` gives the
        shifted tokens' embeddings as the main stack's input; ``run_layer(k, layer, x)`` runs
        one layer of depth ``k`` (1-based), with that depth's positions."""
        out = []
        for k, layer in enumerate(self.layers, start=1):
            embedded = embed(shift(input_ids, k, 0))
            hidden = layer(embedded, hidden, lambda lay, x, k=k: run_layer(k, lay, x))
            out.append(hidden)
        return out

    def attach_loss(
        self,
        lm_loss: torch.Tensor,
        depth_losses: list[torch.Tensor],
        labels: torch.Tensor,
        loss_mask: torch.Tensor | None,
        packed: PackedSeqParams | None,
        shift: Shift = mtp_targets,
        counts: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``lm_loss`` (returned unchanged) carrying the depths' scaled mean loss into backward.

        ``depth_losses[k - 1]`` ``[b, s]``: depth ``k``'s cross entropy against
        ``shift(labels, k)``; positions past the end, across a packed boundary or masked by
        ``shift(loss_mask, k)`` do not count. ``counts(local [depths])``: the token counts
        each depth's mean divides by, when they are not this rank's (context parallelism: the
        shards hold different numbers of valid targets, and the mean is the sequence's)."""
        sums, weights = [], []
        for k, per_token in enumerate(depth_losses, start=1):
            weight = _valid_positions(labels, k, packed, shift).float()
            if loss_mask is not None:
                weight = weight * shift(loss_mask.float(), k, 0)
            sums.append((per_token.float() * weight).sum())
            weights.append(weight.sum())
        denominators = torch.stack(weights)
        if counts is not None:
            denominators = counts(denominators)
        stacked = torch.stack(sums) / denominators.clamp(min=1)
        if self.training:  # evaluation reports its own loss
            self._record(stacked.detach())
        if not torch.is_grad_enabled():
            return lm_loss
        total = stacked.mean() * self.loss_scaling_factor
        return AuxLossAutoScaler.apply(lm_loss, total, self.aux_loss_scale)

    def _record(self, means: torch.Tensor) -> None:
        self._totals = means if self._totals is None else self._totals + means
        self._count += 1

    def statistic_names(self) -> list[str]:
        """The names :meth:`read_statistics` may report (one loss per depth)."""
        return [f"mtp_{k}_loss" for k in range(1, self.depth + 1)]

    def read_statistics(self) -> dict[str, tuple[torch.Tensor, int]]:
        """Each depth's loss summed over the micro-batches since the last read, and their
        count; resets. Reads nothing back to the host."""
        if self._totals is None:
            return {}
        totals, count = self._totals, self._count
        self._totals, self._count = None, 0
        return {name: (totals[i], count) for i, name in enumerate(self.statistic_names())}
