"""The training side of a GRPO step: rollouts to packed micro-batches, log-prob passes and
optimizer steps on the training layout, through the runtime's pipeline schedule.

Every rank holds every rollout of the step (they are gathered after generation), so what each
data-parallel rank trains on is computed identically everywhere, without communication:
sequences are spread over data-parallel ranks by tokens (longest first, to the rank with the
fewest), packed into rows, and grouped into the same number of micro-batches on every rank.
The loss of a micro-batch is ``sum(w * loss)`` with the global aggregation weights ``w``
(:func:`megatron_rl.grpo.token_loss_weights`), scaled by micro-batches x data-parallel size
because the schedule averages over micro-batches and DDP over replicas: the gradient is
that of the step's loss exactly, however the batch is cut.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mcore.models.packing import PackedSeqParams
from megatron_rl.grpo import (
    Aggregation,
    GRPOLossConfig,
    grpo_token_loss,
    token_logprobs,
    token_loss_weights,
)
from megatron_rl.packing import TrainSequence, build_rows, micro_batches, pack_bins

METRIC_SUMS = ("loss", "tokens", "clipped", "entropy", "kl", "ratio", "is_weight", "truncated")


@dataclass
class MiniBatch:
    """This rank's micro-batches of one optimizer step, and what they hold globally."""

    micro_batches: list[dict[str, torch.Tensor]]
    row_length: int
    num_sequences: int
    """Sequences over all data-parallel ranks."""
    tokens: int
    """Real tokens (prompts and completions) over all data-parallel ranks."""
    row_tokens: int
    """Tokens of every row over all data-parallel ranks, padding included."""


def split_over_ranks(lengths: Sequence[int], num_ranks: int) -> list[list[int]]:
    """Indices of ``lengths`` for each rank: longest first, each to the rank with the fewest
    tokens so far (ties to the lower rank); deterministic."""
    load = [0] * num_ranks
    out: list[list[int]] = [[] for _ in range(num_ranks)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(num_ranks), key=lambda r: (load[r], r))
        out[r].append(i)
        load[r] += lengths[i]
    return [sorted(ids) for ids in out]


def make_minibatch(
    sequences: Sequence[TrainSequence],
    *,
    dp_rank: int,
    dp_size: int,
    rows_per_micro_batch: int,
    bin_size: int,
    packing: bool,
    multiple_of: int = 1,
    device: torch.device | None = None,
) -> MiniBatch:
    """This data-parallel rank's micro-batches of ``sequences`` (the whole mini-batch)."""
    lengths = [len(s) for s in sequences]
    shares = split_over_ranks(lengths, dp_size)
    if packing:
        row_length = bin_size
        bins = [pack_bins([lengths[i] for i in share], bin_size) for share in shares]
    else:
        row_length = max(lengths)
        bins = [[[k] for k in range(len(share))] for share in shares]
    row_length = math.ceil(row_length / multiple_of) * multiple_of
    most_rows = max(len(b) for b in bins)
    num_micro = max(1, math.ceil(most_rows / rows_per_micro_batch))
    mine = [sequences[i] for i in shares[dp_rank]]
    rows = build_rows(mine, bins[dp_rank], row_length)
    mbs = micro_batches(rows, rows_per_micro_batch, num_micro)
    if device is not None:
        mbs = [{k: v.to(device) for k, v in mb.items()} for mb in mbs]
    return MiniBatch(
        micro_batches=mbs,
        row_length=row_length,
        num_sequences=len(sequences),
        tokens=sum(lengths),
        row_tokens=sum(len(b) for b in bins) * row_length,
    )


def with_loss_weights(
    sequences: Sequence[TrainSequence], mode: Aggregation, *, max_completion_tokens: int
) -> list[TrainSequence]:
    """``sequences`` with their aggregation weights set for the mini-batch they form."""
    masks = [torch.tensor(s.loss_mask, dtype=torch.float) for s in sequences]
    weights = token_loss_weights(masks, mode, max_completion_tokens=max_completion_tokens)
    return [
        TrainSequence(s.token_ids, s.loss_mask, s.rollout_logprobs, s.advantage, w.tolist())
        for s, w in zip(sequences, weights, strict=True)
    ]


class GRPOTrainer:
    """Runs log-prob passes and GRPO updates of ``chunks`` through ``runtime``."""

    def __init__(
        self,
        runtime: Any,
        chunks: list,
        optimizer: Any,
        *,
        loss_config: GRPOLossConfig,
        temperature: float,
        vocab_size: int,
        packing: bool,
        fp16: bool = False,
    ) -> None:
        self.runtime, self.chunks, self.optimizer = runtime, chunks, optimizer
        self.ps = runtime.parallel_state
        self.loss_config = loss_config
        self.temperature, self.vocab_size = temperature, vocab_size
        self.packing = packing
        self.fp16 = fp16

    def _run(self, chunks: list, batch: MiniBatch, forward_step: Any, forward_only: bool):
        # One iterator per model chunk: with virtual pipeline stages each reads every
        # micro-batch (the first for tokens, the last for the loss).
        iterators = [iter(batch.micro_batches) for _ in chunks]
        return self.runtime.forward_backward(
            forward_step_func=forward_step,
            data_iterator=iterators if len(chunks) > 1 else iterators[0],
            model=chunks,
            num_microbatches=len(batch.micro_batches),
            seq_length=batch.row_length,
            micro_batch_size=batch.micro_batches[0]["tokens"].shape[0],
            forward_only=forward_only,
            grad_scale_func=self.optimizer.scale_loss if self.fp16 and not forward_only else None,
        )

    def _forward(self, mb: dict[str, torch.Tensor], model: Any) -> torch.Tensor:
        packed = PackedSeqParams(mb["segment_ids"]) if self.packing else None
        return model(mb["tokens"], position_ids=mb["position_ids"], packed_seq_params=packed)

    def _logprobs(self, logits: torch.Tensor, labels: torch.Tensor, with_entropy: bool = False):
        """The policy's log-probs of ``labels`` (and its entropy): ``softmax(logits / T)`` over
        the tokenizer's ids."""
        return token_logprobs(
            logits,
            labels,
            temperature=self.temperature,
            vocab_size=self.vocab_size,
            with_entropy=with_entropy,
        )

    @torch.no_grad()
    def compute_logprobs(self, chunks: list, batch: MiniBatch, key: str) -> None:
        """Store ``chunks``' per-token log-probs in each micro-batch under ``key`` (on the
        last pipeline stage, where the loss needs them)."""

        def forward_step(data_iterator: Any, model: Any):
            mb = next(data_iterator)
            output = self._forward(mb, model)

            def store(logits: torch.Tensor):
                mb[key], _ = self._logprobs(logits, mb["labels"])
                return logits.new_zeros(()), {}

            return output, store

        self._run(chunks, batch, forward_step, forward_only=True)

    def train_step(self, batch: MiniBatch) -> tuple[dict[str, float], float, bool]:
        """One optimizer step on ``batch``; returns the global metric sums (see
        :data:`METRIC_SUMS`), the grad norm and whether the step was skipped."""
        cfg = self.loss_config
        scale = len(batch.micro_batches) * self.ps.dp_cp_size

        def forward_step(data_iterator: Any, model: Any):
            mb = next(data_iterator)
            output = self._forward(mb, model)

            def loss_func(logits: torch.Tensor):
                want_entropy = cfg.entropy_coeff > 0
                logp, entropy = self._logprobs(logits, mb["labels"], with_entropy=want_entropy)
                if not want_entropy:  # only reported: no graph for it
                    with torch.no_grad():
                        _, entropy = self._logprobs(logits.detach(), mb["labels"], True)
                assert entropy is not None  # asked for, one way or the other
                old = mb["old_logprobs"] if "old_logprobs" in mb else logp.detach()
                out = grpo_token_loss(
                    logp,
                    old,
                    mb["advantages"],
                    cfg,
                    rollout_logp=mb["rollout_logprobs"],
                    ref_logp=mb.get("ref_logprobs"),
                    entropy=entropy,
                )
                w, m = mb["weights"], mb["loss_mask"]
                total = (out.loss * w).sum()
                sums = {
                    "loss": total.detach(),
                    "tokens": m.sum(),
                    "clipped": (out.clipped * m).sum(),
                    "entropy": (entropy.detach() * m).sum(),
                    "kl": (out.kl.detach() * m).sum() if out.kl is not None else m.new_zeros(()),
                    "ratio": (out.ratio * m).sum(),
                    "is_weight": (out.importance_weight * m).sum(),
                    "truncated": (out.truncated * m).sum(),
                }
                return total * scale, sums

            return output, loss_func

        return self._optimizer_step(batch, forward_step)

    def sft_step(self, batch: MiniBatch) -> tuple[float, float]:
        """One supervised optimizer step on ``batch``: cross-entropy of the policy (the same
        ``softmax(logits / temperature)`` GRPO trains) on the masked tokens, weighted as the
        sequences' weights say. Returns the step's loss and grad norm."""
        scale = len(batch.micro_batches) * self.ps.dp_cp_size

        def forward_step(data_iterator: Any, model: Any):
            mb = next(data_iterator)
            output = self._forward(mb, model)

            def loss_func(logits: torch.Tensor):
                logp, _ = self._logprobs(logits, mb["labels"])
                total = -(logp * mb["weights"]).sum()
                sums: dict[str, torch.Tensor] = dict.fromkeys(METRIC_SUMS, total.new_zeros(()))
                sums.update(loss=total.detach(), tokens=mb["loss_mask"].sum())
                return total * scale, sums

            return output, loss_func

        sums, grad_norm, _skipped = self._optimizer_step(batch, forward_step)
        return sums["loss"], grad_norm

    def _optimizer_step(self, batch: MiniBatch, forward_step: Any) -> tuple[dict, float, bool]:
        """Forward and backward over ``batch``, gradient reduction, one optimizer step."""
        self.optimizer.zero_grad()
        metrics = self._run(self.chunks, batch, forward_step, forward_only=False)
        self.runtime.finalize_grads(self.chunks)
        skipped, grad_norm = self.optimizer.step()
        return self.reduce_sums(metrics), float(grad_norm), bool(skipped)

    def reduce_sums(self, metrics: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Sums of the micro-batches' metrics over the whole batch: each data-parallel
        replica's last stage counts once (its other tensor-parallel ranks hold copies)."""
        local = torch.zeros(len(METRIC_SUMS), dtype=torch.float64)
        if self.ps.tp_rank == 0 and self.ps.cp_rank == 0:
            for m in metrics:
                local += torch.tensor([float(m[k]) for k in METRIC_SUMS], dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl":
                local = local.cuda()
            dist.all_reduce(local)
        return dict(zip(METRIC_SUMS, local.cpu().tolist(), strict=True))
