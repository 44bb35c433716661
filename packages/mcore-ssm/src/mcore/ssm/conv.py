"""The causal depthwise convolution in front of Mamba-2's and the gated delta net's scans.

Each channel is convolved on its own over the last ``k`` inputs. At inference a request keeps
its last ``k - 1`` inputs (the *conv state*) so a later chunk or decode step continues exactly
where the previous one stopped; packed training rows (``seq_idx``) never mix two sequences.
"""

from __future__ import annotations

from typing import Literal, overload

import torch
import torch.nn.functional as F


@overload
def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    return_final_state: Literal[False] = False,
) -> torch.Tensor: ...


@overload
def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    return_final_state: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor]: ...


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``silu(conv(x))`` of ``x [b, s, c]`` with ``weight [c, k]`` -> ``[b, s, c]``.

    ``initial_state [b, c, k - 1]``: the inputs before ``x`` (oldest first; zeros if None).
    ``seq_idx [b, s]``: nondecreasing sequence ids of a packed row; a tap that reaches into
    another sequence reads zero (the initial state belongs to the row's first sequence).
    ``lengths [b]``: real tokens per row (the rest is right padding), so the final state is
    taken after the last real token. The final state is the last ``k - 1`` inputs.
    """
    b, s, c = x.shape
    k = weight.shape[-1]
    xt = x.transpose(1, 2)
    prefix = xt.new_zeros(b, c, k - 1) if initial_state is None else initial_state.to(xt.dtype)
    full = torch.cat([prefix, xt], dim=-1)  # [b, c, k - 1 + s]
    if seq_idx is None:
        y = F.conv1d(full, weight.unsqueeze(1), bias, groups=c)
    else:
        windows = full.unfold(-1, k, 1)  # [b, c, s, k]: tap j of output t reads input t - k + 1 + j
        same = _same_sequence_taps(seq_idx, k).unsqueeze(1).to(windows.dtype)
        y = (windows * same * weight[:, None, :]).sum(-1)
        if bias is not None:
            y = y + bias[:, None]
    y = F.silu(y).transpose(1, 2)
    if not return_final_state:
        return y
    if lengths is None:
        final = full[..., s:]
    else:
        index = lengths.view(b, 1, 1) + torch.arange(k - 1, device=x.device).view(1, 1, -1)
        final = full.gather(-1, index.expand(b, c, k - 1))
    return y, final


def _same_sequence_taps(seq_idx: torch.Tensor, k: int) -> torch.Tensor:
    """``[b, s, k]`` 1 where tap ``j`` of token ``t`` reads a token of ``t``'s own sequence."""
    b = seq_idx.shape[0]
    first = seq_idx[:, :1].expand(b, k - 1)  # the initial state counts as the first sequence's
    padded = torch.cat([first, seq_idx], dim=1)  # [b, k - 1 + s]
    taps = padded.unfold(1, k, 1)  # [b, s, k]
    return taps == seq_idx.unsqueeze(-1)


def causal_conv1d_step(
    x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """One decode step: ``x [b, c]`` with ``state [b, c, k - 1]`` (updated in place) ->
    ``silu(conv) [b, c]``."""
    window = torch.cat([state, x.unsqueeze(-1).to(state.dtype)], dim=-1)  # [b, c, k]
    state.copy_(window[..., 1:])
    y = (window * weight).sum(-1)
    if bias is not None:
        y = y + bias
    return F.silu(y).to(x.dtype)
