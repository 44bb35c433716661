"""The output layer and the cross-entropy in one, over token chunks: the logits are never whole.

``fused_linear_cross_entropy(hidden, weight, labels)`` equals a ``ColumnParallelLinear`` without
``gather_output`` followed by :func:`vocab_parallel_cross_entropy`, but holds the logits of at
most ``chunk_tokens`` tokens at a time, ``chunk_tokens x vocab / tp`` numbers, instead of
``s x b x vocab / tp`` fp32 logits and as much again for their gradient: for a 128k-256k
vocabulary those dominate a micro-batch's activation memory.

Forward, chunk by chunk: ``logits = h Wᵀ`` on this rank's vocabulary shard, then per token the
shard's max, ``Σ exp(logit - max)`` and the target's logit (zero off the rank that owns the
label), kept as ``[tokens]`` vectors. After the last chunk, one MAX all-reduce of the maxima and
one SUM all-reduce of the rescaled sums (each shard's ``Σ exp`` times ``exp(max_r - max)``) and
the target logits give ``lse = log Σ_vocab exp(logit)`` and ``loss = lse - target``: the same
max-then-sum-exp reduction as the unfused loss, two collectives per call instead of per chunk.

Backward recomputes each chunk's logits: ``softmax = exp(logits - lse)`` (``lse`` is saved, so
no collective), ``g = (softmax - onehot) · grad_loss`` per token, ``grad_h = g W`` and
``grad_W += gᵀ h``. Computing the gradients in forward instead (Liger-kernel style) saves the
recompute but is only right for one scalar upstream gradient: ``grad_W = Σ_t c_t g_tᵀ h_t``
cannot be rebuilt from the unscaled ``Σ_t g_tᵀ h_t`` when the per-token ``c_t`` (the loss
mask, applied after this function) differ. The recompute costs one more ``h Wᵀ`` per chunk.

The TP region is entered as ``ColumnParallelLinear`` enters it, with the same mappings: under
sequence parallelism the input ``[s / tp, b, h]`` is all-gathered along the sequence (backward
reduce-scatters its gradient), otherwise ``copy_to_tensor_parallel_region`` all-reduces the
input's gradient in backward. The weight's gradient is returned to autograd, as ``F.linear``'s
is, so a tied embedding table sums both uses and a data-parallel wrapper moves ``.grad`` into
``main_grad`` with its usual hooks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from mcore.parallel.tensor_parallel.mappings import (
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
)
from mcore.parallel.tensor_parallel.utils import group_rank, group_size


def _chunks(tokens: int, chunk_tokens: int) -> list[tuple[int, int]]:
    return [(i, min(i + chunk_tokens, tokens)) for i in range(0, tokens, chunk_tokens)]


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,  # [n, h], already gathered over the sequence
        weight: torch.Tensor,  # [vocab / tp, h]
        target: torch.Tensor,  # [n]
        group: dist.ProcessGroup | None,
        chunk_tokens: int,
        label_smoothing: float,
        ignore_index: int,
    ) -> torch.Tensor:
        tp_size, tp_rank = group_size(group), group_rank(group)
        local_vocab = weight.shape[0]
        vocab = local_vocab * tp_size
        start = tp_rank * local_vocab
        tokens = hidden.shape[0]

        target = target.long()
        owned = (target >= start) & (target < start + local_vocab)
        local_target = (target - start).masked_fill(~owned, 0)

        # Per token: this shard's max, Σ exp(logit - max), target logit (0 off its owner) and,
        # with label smoothing, Σ logit; fp32 like the unfused loss.
        local_max = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
        rows = 3 if label_smoothing > 0.0 else 2
        sums = torch.empty(rows, tokens, dtype=torch.float32, device=hidden.device)
        for lo, hi in _chunks(tokens, chunk_tokens):
            logits = (hidden[lo:hi] @ weight.t()).float()
            chunk_max = logits.amax(dim=-1)
            local_max[lo:hi] = chunk_max
            picked = logits.gather(-1, local_target[lo:hi].unsqueeze(-1)).squeeze(-1)
            sums[1, lo:hi] = picked.masked_fill(~owned[lo:hi], 0.0)
            if label_smoothing > 0.0:
                sums[2, lo:hi] = logits.sum(dim=-1)
            # In place: ``logits`` is a fresh fp32 buffer (or the matmul's own output).
            sums[0, lo:hi] = logits.sub_(chunk_max.unsqueeze(-1)).exp_().sum(dim=-1)
            del logits

        logits_max = local_max
        if tp_size > 1:
            logits_max = local_max.clone()
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
            sums[0].mul_((local_max - logits_max).exp_())
            dist.all_reduce(sums, group=group)
        # In the max-shifted frame of the unfused loss, where a label outside the vocabulary
        # (owned by no rank) has target logit 0, as there.
        in_vocab = (target >= 0) & (target < vocab)
        shifted_target = (sums[1] - logits_max).masked_fill_(~in_vocab, 0.0)
        log_sum_exp = sums[0].log()
        loss = log_sum_exp - shifted_target
        if label_smoothing > 0.0:
            # As vocab_parallel_cross_entropy: (1 - ε)·nll + ε·(log Σ exp - mean shifted logit).
            smooth_loss = log_sum_exp - (sums[2] / vocab - logits_max)
            loss = (1.0 - label_smoothing) * loss + label_smoothing * smooth_loss
        lse = log_sum_exp + logits_max  # log Σ_vocab exp(logit), per token, for backward
        ignored = target == ignore_index
        loss = loss.masked_fill(ignored, 0.0)

        ctx.save_for_backward(hidden, weight, lse, local_target, owned, ignored)
        ctx.chunk_tokens, ctx.label_smoothing, ctx.vocab = chunk_tokens, label_smoothing, vocab
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, lse, local_target, owned, ignored = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        eps = ctx.label_smoothing
        scale = grad_loss.float().masked_fill(ignored, 0.0)
        target_weight = (1.0 - eps) * owned.float()
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        for lo, hi in _chunks(hidden.shape[0], ctx.chunk_tokens):
            h = hidden[lo:hi]
            # d loss / d logits = softmax - (1 - ε)·onehot(target) - ε / V, times grad_loss.
            grad = (h @ weight.t()).float()
            grad.sub_(lse[lo:hi].unsqueeze(-1)).exp_()
            grad.scatter_add_(
                -1, local_target[lo:hi].unsqueeze(-1), -target_weight[lo:hi].unsqueeze(-1)
            )
            if eps > 0.0:
                grad.sub_(eps / ctx.vocab)
            grad.mul_(scale[lo:hi].unsqueeze(-1))
            grad = grad.to(weight.dtype)  # as F.linear's backward sees it unfused
            if grad_hidden is not None:
                torch.mm(grad, weight, out=grad_hidden[lo:hi])
            if grad_weight is not None:
                grad_weight.addmm_(grad.t(), h)
            del grad
        return grad_hidden, grad_weight, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    sequence_parallel: bool = False,
    chunk_tokens: int = 4096,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per-token cross-entropy (fp32) ``[s, b]`` of ``hidden @ weightᵀ`` against ``labels``,
    holding the logits of at most ``chunk_tokens`` tokens at a time.

    ``hidden``: ``[s, b, h]``, or ``[s / tp, b, h]`` with ``sequence_parallel`` (gathered along
    the sequence first, as ``ColumnParallelLinear`` does); ``weight``: this rank's vocabulary
    shard ``[vocab / tp, h]`` (rank ``r`` holding ids ``[r · vocab/tp, (r + 1) · vocab/tp)``);
    ``labels``: global ids ``[s, b]``. Equal, loss and gradients, to
    ``vocab_parallel_cross_entropy(ColumnParallelLinear(...)(hidden, weight), labels, ...)``
    with ``bias=False`` and ``gather_output=False``: 0 where ``labels == ignore_index``, labels
    outside the vocabulary unchecked. Backward recomputes each chunk's logits.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if hidden.dim() < 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} disagree: weight "
            "must be this rank's [vocab / tp, hidden] shard of the output layer"
        )
    if sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden, tp_group)
    else:
        hidden = copy_to_tensor_parallel_region(hidden, tp_group)
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} (gathered over the sequence under sequence "
            f"parallelism) and labels {tuple(labels.shape)} disagree: labels must be hidden's "
            "shape without the hidden dimension"
        )
    loss = _FusedLinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        labels.reshape(-1),
        tp_group,
        chunk_tokens,
        label_smoothing,
        ignore_index,
    )
    return loss.view(labels.shape)
