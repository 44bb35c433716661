"""The Mamba-2 state-space-dual (SSD) scan in plain torch: the reference every other path matches.

Per head, with a scalar decay per token, the recurrence is::

    state_t = exp(dt_t * A) * state_{t-1} + dt_t * outer(x_t, B_t)      # [p, n]
    y_t     = state_t @ C_t + D * x_t                                    # [p]

:func:`ssd_scan` evaluates it for a whole sequence in the chunked form: the sequence is cut into
chunks of ``chunk_size`` tokens; inside a chunk the outputs are a masked, decay-weighted
"attention" ``(C B^T * L) x`` (quadratic in the chunk only), each chunk's own contribution to the
state is a sum of outer products, and a short recurrence over chunks carries the state from one
chunk to the next. Work and memory are ``O(s * chunk_size)``, nothing ``[s, s]`` is built, and
every step is out of place, so autograd differentiates it. :func:`ssd_step` is the recurrence for
one token, for decoding.

Both compute in fp32 (fp64 when ``x`` is fp64, which the tests use) and return ``y`` in
``x.dtype``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ssd_scan", "ssd_step"]


def _compute_dtype(x: Tensor) -> torch.dtype:
    """fp32 for every input dtype but fp64, which keeps fp64 (for exact checks)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_shapes(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None) -> None:
    """Raise ``ValueError`` unless the shapes fit ``x``'s (token dims already split off)."""
    *lead, h, _ = x.shape
    g = B.shape[-2]
    if tuple(dt.shape) != (*lead, h):
        raise ValueError(f"dt has shape {tuple(dt.shape)}, expected {(*lead, h)}")
    if tuple(A.shape) != (h,):
        raise ValueError(f"A has shape {tuple(A.shape)}, expected ({h},)")
    if B.shape != C.shape or tuple(B.shape[:-2]) != tuple(lead):
        raise ValueError(f"B {tuple(B.shape)} and C {tuple(C.shape)} must both be {(*lead, g, -1)}")
    if g == 0 or h % g:
        raise ValueError(f"{h} heads cannot be split into {g} groups")
    if D is not None and tuple(D.shape) != (h,):
        raise ValueError(f"D has shape {tuple(D.shape)}, expected ({h},)")


def _segment_sums(a: Tensor) -> Tensor:
    """``out[..., i, j] = a[..., j+1] + ... + a[..., i]`` for ``i >= j``; ``-inf`` where ``i < j``.

    Each entry is summed directly over its own segment (a cumulative sum along masked rows)
    rather than as a difference of two prefix sums, which would lose the small sums near the
    diagonal to cancellation once the prefix sums grow large.
    """
    length = a.shape[-1]
    ones = torch.ones(length, length, dtype=torch.bool, device=a.device)
    # rows j, columns k: a_k where k > j, cumulated over k gives sum_{j < k <= i} in column i.
    after_j = a[..., None, :].expand(*a.shape[:-1], length, length)
    sums = after_j.masked_fill(~ones.triu(1), 0).cumsum(-1).transpose(-1, -2)
    return sums.masked_fill(~ones.tril(), float("-inf"))


def ssd_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    chunk_size: int = 128,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    seq_idx: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The Mamba-2 scan over whole sequences, in chunks of ``chunk_size`` tokens.

    Shapes: ``x`` ``[b, s, h, p]``, ``dt`` ``[b, s, h]`` (already softplus'd, biased and clamped),
    ``A`` ``[h]`` (negative), ``B`` and ``C`` ``[b, s, g, n]`` with head ``i`` reading group
    ``i // (h // g)``, ``D`` ``[h]``, ``initial_state`` ``[b, h, p, n]``. ``seq_idx`` ``[b, s]``
    (nondecreasing per row) marks packed sequences: the state restarts from zero where it changes,
    so tokens of different sequences never interact; ``initial_state`` is the state before the
    first token of a row and so only reaches that row's first sequence.

    Returns ``y`` ``[b, s, h, p]`` in ``x.dtype`` and, with ``return_final_state``, the state
    after the row's last token, ``[b, h, p, n]`` in fp32 (fp64 for fp64 ``x``). ``s`` need not be a
    multiple of ``chunk_size``: the tail is padded with ``dt = 0`` tokens, which neither decay nor
    add to the state.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be [batch, seqlen, heads, headdim], got shape {tuple(x.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    _check_shapes(x, dt, A, B, C, D)
    b, s, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g  # heads per group; heads are indexed (group, r) below
    if seq_idx is not None and tuple(seq_idx.shape) != (b, s):
        raise ValueError(f"seq_idx has shape {tuple(seq_idx.shape)}, expected {(b, s)}")
    if initial_state is not None and tuple(initial_state.shape) != (b, h, p, n):
        raise ValueError(
            f"initial_state has shape {tuple(initial_state.shape)}, expected {(b, h, p, n)}"
        )
    f = _compute_dtype(x)

    if s == 0:
        y = x.new_empty(x.shape)
        if not return_final_state:
            return y
        state = x.new_zeros(b, h, p, n, dtype=f) if initial_state is None else initial_state
        return y, state.to(f)

    length = min(chunk_size, s)
    pad = -s % length
    nc = (s + pad) // length

    def chunked(t: Tensor, *inner: int) -> Tensor:
        """``[b, s, ...]`` as ``[b, chunks, length, *inner]`` in the compute dtype, zero-padded."""
        t = t.to(f)
        if pad:
            t = torch.cat([t, t.new_zeros(b, pad, *t.shape[2:])], dim=1)
        return t.reshape(b, nc, length, *inner)

    xc = chunked(x, g, r, p)
    Bc, Cc = chunked(B, g, n), chunked(C, g, n)
    dtc = chunked(dt, g, r).permute(0, 3, 4, 1, 2)  # [b, g, r, c, l]: tokens last
    a = dtc * A.to(f).reshape(g, r, 1, 1)  # log of each token's decay

    seg = _segment_sums(a)  # [b, g, r, c, i, j]: log decay from after token j through token i
    prefix = a.cumsum(-1)  # [b, g, r, c, l]: log decay from the chunk's start through token i
    carry = prefix[..., -1].exp()  # [b, g, r, c]: decay of a state across the whole chunk
    reads_start = None  # [b, c, l]: whether token i belongs to the sequence the chunk starts in
    if seq_idx is not None:
        sq = seq_idx
        if pad:  # the padding continues the row's last sequence
            sq = torch.cat([sq, sq[:, -1:].expand(b, pad)], dim=1)
        sq = sq.reshape(b, nc, length)
        seg = seg.masked_fill((sq[..., :, None] != sq[..., None, :])[:, None, None], float("-inf"))
        ends = sq[:, :, -1]
        before = torch.cat([sq[:, :1, 0], ends[:, :-1]], dim=1)  # sequence of the incoming state
        reads_start = sq == before[..., None]
        carry = carry * (ends == before)[:, None, None]
    decay = seg.exp()

    # 1. Within each chunk: y_i = sum_{j <= i} (C_i . B_j) decay_ij dt_j x_j.
    scores = torch.einsum("bcign,bcjgn->bgcij", Cc, Bc)[:, :, None] * decay
    y = torch.einsum("bgrcij,bcjgrp->bcigrp", scores * dtc[..., None, :], xc)

    # 2. Each chunk's own contribution to the state at its end (the last row of the decays).
    to_end = (decay[..., -1, :] * dtc).permute(0, 3, 4, 1, 2)  # [b, c, l, g, r]
    chunk_states = torch.einsum("bclgrp,bclgn->bcgrpn", xc * to_end[..., None], Bc)

    # 3. Carry the state across chunks: a recurrence over the (few) chunks, not the tokens.
    if initial_state is None:
        state = xc.new_zeros(b, g, r, p, n)
    else:
        state = initial_state.to(f).reshape(b, g, r, p, n)
    starts = []
    for c in range(nc):
        starts.append(state)
        state = carry[:, :, :, c, None, None] * state + chunk_states[:, c]
    start_states = torch.stack(starts, dim=1)  # [b, c, g, r, p, n]: state entering each chunk

    # 4. What each token reads from the state its chunk started with.
    from_start = prefix.exp().permute(0, 3, 4, 1, 2)  # [b, c, l, g, r]
    if reads_start is not None:
        from_start = from_start * reads_start[..., None, None]
    y = y + torch.einsum("bclgn,bcgrpn->bclgrp", Cc, start_states) * from_start[..., None]

    if D is not None:
        y = y + D.to(f).reshape(g, r, 1) * xc
    y = y.reshape(b, nc * length, h, p)[:, :s].to(x.dtype)
    if return_final_state:
        return y, state.reshape(b, h, p, n)
    return y


def ssd_step(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
) -> Tensor:
    """One decoding step of the recurrence: updates ``state`` in place and returns ``y``.

    Shapes: ``state`` ``[b, h, p, n]`` (fp32), ``x`` ``[b, h, p]``, ``dt`` ``[b, h]`` (already
    softplus'd and biased), ``A`` ``[h]``, ``B`` and ``C`` ``[b, g, n]``, ``D`` ``[h]``. Computes in
    ``state``'s dtype; ``y`` ``[b, h, p]`` is in ``x.dtype``.
    """
    if x.dim() != 3:
        raise ValueError(f"x must be [batch, heads, headdim], got shape {tuple(x.shape)}")
    _check_shapes(x, dt, A, B, C, D)
    b, h, p = x.shape
    g, n = B.shape[-2:]
    if tuple(state.shape) != (b, h, p, n):
        raise ValueError(f"state has shape {tuple(state.shape)}, expected {(b, h, p, n)}")
    f = state.dtype
    r = h // g
    dt_f, x_f = dt.to(f), x.to(f)
    B_h = B.to(f).repeat_interleave(r, dim=1)  # [b, h, n]
    C_h = C.to(f).repeat_interleave(r, dim=1)
    state.mul_(torch.exp(dt_f * A.to(f))[..., None, None])
    state.add_((dt_f[..., None] * x_f)[..., None] * B_h[:, :, None, :])
    y = torch.einsum("bhpn,bhn->bhp", state, C_h)
    if D is not None:
        y = y + D.to(f)[:, None] * x_f
    return y.to(x.dtype)
