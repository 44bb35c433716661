"""Cross-entropy over vocab-parallel logits, without gathering the vocabulary.

Each TP rank holds logits for a contiguous slice of the vocabulary (the output of a
``ColumnParallelLinear`` without ``gather_output``). Only a few numbers per token cross the
TP group, never the logits: one all-reduce for the max (a stable softmax), then one for the
target's logit (only its owner has it), ``Σ exp`` and, with label smoothing, ``Σ logits``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from mcore.parallel.tensor_parallel.utils import group_rank, group_size


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        target: torch.Tensor,
        group: dist.ProcessGroup | None,
        label_smoothing: float,
        ignore_index: int,
    ) -> torch.Tensor:
        tp_size, tp_rank = group_size(group), group_rank(group)
        communicate = tp_size > 1
        local_vocab = logits.shape[-1]
        vocab = local_vocab * tp_size
        start = tp_rank * local_vocab

        # The fp32 upcast lives here: the loss is where low precision hurts.
        logits_max = logits.detach().amax(dim=-1).float()
        if communicate:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        # A new fp32 tensor, so the in-place steps below never touch the caller's logits.
        shifted = logits.float() - logits_max.unsqueeze(-1)

        target = target.long()
        owned = (target >= start) & (target < start + local_vocab)
        local_target = (target - start).masked_fill(~owned, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = target_logit.masked_fill(~owned, 0.0)

        sums = [target_logit]
        if label_smoothing > 0.0:
            sums.append(shifted.sum(dim=-1))
        softmax = shifted.exp_()  # shifted logits are no longer needed: reuse the buffer
        sums.append(softmax.sum(dim=-1))
        reduced = torch.stack(sums)
        if communicate:
            dist.all_reduce(reduced, group=group)
        target_logit, sum_exp = reduced[0], reduced[-1]

        log_sum_exp = sum_exp.log()
        loss = log_sum_exp - target_logit
        if label_smoothing > 0.0:
            # torch's smoothing: target distribution (1 - ε)·onehot + ε/V, so the loss adds
            # ε · mean over the vocabulary of -log p = ε · (log Σexp - Σ shifted / V).
            smooth_loss = log_sum_exp - reduced[1] / vocab
            loss = (1.0 - label_smoothing) * loss + label_smoothing * smooth_loss
        ignored = target == ignore_index
        loss = loss.masked_fill(ignored, 0.0)

        softmax.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, owned, ignored)
        ctx.label_smoothing, ctx.vocab, ctx.logits_dtype = label_smoothing, vocab, logits.dtype
        ctx.backward_done = False
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.backward_done:
            raise RuntimeError(
                "vocab_parallel_cross_entropy's backward reuses its saved softmax in place to "
                "save memory, so it can run only once per forward (retain_graph is unsupported)"
            )
        ctx.backward_done = True
        softmax, local_target, owned, ignored = ctx.saved_tensors
        eps = ctx.label_smoothing
        # d loss / d logits = softmax - (1 - ε)·onehot(target) - ε / V; zero for ignored tokens.
        # The softmax buffer (vocab / tp per token, the largest tensor here) becomes the gradient.
        grad = softmax
        target_weight = (1.0 - eps) * owned.to(grad.dtype)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -target_weight.unsqueeze(-1))
        if eps > 0.0:
            grad.sub_(eps / ctx.vocab)
        scale = grad_loss.float().masked_fill(ignored, 0.0)
        grad.mul_(scale.unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per-token cross-entropy (fp32) of vocab-parallel ``logits`` against global ``target`` ids.

    ``logits``: ``[..., vocab / tp]``, rank ``r`` holding vocabulary ids
    ``[r · vocab/tp, (r + 1) · vocab/tp)``; ``target``: ``[...]``. Returns ``[...]``, 0 where
    ``target == ignore_index``; equal to ``F.cross_entropy(full_logits.flatten(0, -2),
    target.flatten(), reduction="none", label_smoothing=..., ignore_index=...)``. Targets outside
    the vocabulary are not checked (that would synchronise with the device).
    """
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if logits.shape[:-1] != target.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree: "
            "logits must be target's shape plus the local vocabulary dimension"
        )
    return _VocabParallelCrossEntropy.apply(logits, target, tp_group, label_smoothing, ignore_index)
