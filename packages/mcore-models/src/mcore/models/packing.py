"""Packed sequences: several sequences in one row, attending only within themselves.

RL rollouts and SFT samples come in many lengths; packing them into fixed-size rows wastes no
compute on padding. A row ``[a a a b b c c c c]`` is described by its sequence boundaries
(``cu_seqlens = [0, 3, 5, 9]``, as in flash-attention's varlen API); attention is then causal
*within* each sequence only (block-diagonal), and positions restart at each boundary
(:meth:`PackedSeqParams.position_ids`), so every sequence computes exactly what it would alone.

Pass it as ``GPTModel(...)(ids, position_ids=p.position_ids(), labels=..., packed_seq_params=p)``
with ``ids`` of shape ``[1, T]`` (or ``[b, T]`` with ``segment_ids`` per row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedSeqParams:
    """Which sequence each token of a packed batch belongs to.

    ``segment_ids`` ``[b, T]``: tokens attend to earlier tokens of the same id only. Ids below 0
    mark padding, which attends to itself alone (its outputs are never used).
    """

    segment_ids: torch.Tensor

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: Sequence[int] | torch.Tensor, total: int | None = None):
        """One packed row from boundaries ``[0, l0, l0 + l1, ...]``; tokens past the last
        boundary (up to ``total``) are padding."""
        cu = torch.as_tensor(cu_seqlens, dtype=torch.long)
        lengths = (cu[1:] - cu[:-1]).tolist()
        return cls.from_lengths(lengths, total=total)

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], total: int | None = None) -> PackedSeqParams:
        """One packed row holding sequences of these lengths, padded to ``total`` tokens."""
        used = sum(lengths)
        total = used if total is None else total
        if total < used or any(n <= 0 for n in lengths):
            raise ValueError(f"cannot pack lengths {list(lengths)} into {total} tokens")
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(list(lengths)))
        pad = torch.full((total - used,), -1, dtype=torch.long)
        return cls(torch.cat([ids, pad]).unsqueeze(0))

    @property
    def cu_seqlens(self) -> torch.Tensor:
        """Boundaries of the first row's sequences (flash-attention's varlen format)."""
        row = self.segment_ids[0]
        real = row[row >= 0]
        counts = torch.bincount(real - real.min()) if real.numel() else real
        return torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])

    def position_ids(self) -> torch.Tensor:
        """``[b, T]`` positions that restart at 0 at every sequence (padding continues)."""
        seg = self.segment_ids
        start = torch.ones_like(seg, dtype=torch.bool)
        start[:, 1:] = seg[:, 1:] != seg[:, :-1]
        index = torch.arange(seg.shape[1], device=seg.device).expand_as(seg)
        first = torch.where(start, index, torch.zeros_like(index)).cummax(dim=1).values
        return index - first

    def attention_mask(self, device: torch.device | None = None) -> torch.Tensor:
        """``[b, 1, T, T]`` boolean mask, True where a query may attend to a key: the same
        sequence and not later (padding attends to itself only)."""
        seg = self.segment_ids.to(device) if device is not None else self.segment_ids
        t = seg.shape[1]
        same = seg[:, :, None] == seg[:, None, :]
        causal = torch.ones(t, t, dtype=torch.bool, device=seg.device).tril()
        pad = (seg < 0)[:, :, None] & ~torch.eye(t, dtype=torch.bool, device=seg.device)
        return (same & causal & ~pad).unsqueeze(1)
