"""The gated delta rule (Qwen3-Next's linear attention) in plain torch: chunked scan and one step.

Per head, with ``k`` (and ``q``) l2-normalised and ``q`` scaled, the state ``S`` ``[dk, dv]``
evolves as ``S_t = exp(g_t) S_{t-1} (I - beta_t k_t k_t^T) + beta_t k_t v_t^T`` and each token
reads ``o_t = S_t^T q_t``. :func:`gated_delta_rule` computes a whole sequence chunk by chunk:
inside a chunk the sequential delta updates are folded into one unit lower-triangular solve
(the UT transform of the WY representation), and only the ``[dk, dv]`` state is carried from
chunk to chunk, so the work is ``O(s * chunk)`` and nothing ``[s, s]``-sized is built. Everything
runs in fp32 (fp64 when the inputs are fp64), on any device, and is differentiable by autograd.
:func:`gated_delta_step` is the same recurrence for one token, updating a decode state in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gated_delta_rule", "gated_delta_step"]

L2NORM_EPS = 1e-6
"""The epsilon of the q/k l2 norm: ``x * rsqrt(sum(x**2) + eps)``, as Qwen3-Next (and FLA) use."""


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp64 when any input is fp64 (for exact checks), else fp32."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def normalize_qk(
    q: Tensor, k: Tensor, use_qk_l2norm: bool, scale: float | None, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``q`` and ``k`` in ``dtype``, l2-normalised over the last dim if asked, ``q`` scaled."""
    q, k = q.to(dtype), k.to(dtype)
    if use_qk_l2norm:
        q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + L2NORM_EPS)
        k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + L2NORM_EPS)
    return q * (q.shape[-1] ** -0.5 if scale is None else scale), k


def segment_ids(seq_idx: Tensor) -> Tensor:
    """``[b, s]`` int64 ids counting the sequence changes of a packed row, from 0.

    Only the changes matter: the state resets wherever ``seq_idx`` differs from the previous
    token, so two sequences with the same id are never merged, whatever the ids are.
    """
    changes = (seq_idx[:, 1:] != seq_idx[:, :-1]).to(torch.int64)
    return F.pad(changes.cumsum(1), (1, 0))


def check_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    chunk_size: int,
    initial_state: Tensor | None,
    seq_idx: Tensor | None,
) -> None:
    """Raise ``ValueError`` on shapes that do not fit ``[b, s, h, dk]`` / ``[b, s, h, dv]``."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [b, s, h, dk], got {tuple(q.shape)}, {k.shape}")
    b, s, h, dk = q.shape
    if v.dim() != 4 or v.shape[:3] != (b, s, h):
        raise ValueError(f"v must be [b, s, h, dv] = [{b}, {s}, {h}, dv], got {tuple(v.shape)}")
    for name, t in (("g", g), ("beta", beta)):
        if t.shape != (b, s, h):
            raise ValueError(f"{name} must be [b, s, h] = [{b}, {s}, {h}], got {tuple(t.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    want = (b, h, dk, v.shape[-1])
    if initial_state is not None and initial_state.shape != want:
        raise ValueError(f"initial_state must be {list(want)}, got {tuple(initial_state.shape)}")
    if seq_idx is not None and (seq_idx.shape != (b, s) or seq_idx.is_floating_point()):
        raise ValueError(f"seq_idx must be integer [b, s] = [{b}, {s}], got {seq_idx.shape}")


def gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    chunk_size: int = 64,
    initial_state: Tensor | None = None,
    seq_idx: Tensor | None = None,
    use_qk_l2norm: bool = True,
    scale: float | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The gated delta rule over a sequence, by chunks of ``chunk_size`` tokens.

    ``q``, ``k`` ``[b, s, h, dk]`` (key heads already repeated to the value heads), ``v``
    ``[b, s, h, dv]``, ``g`` ``[b, s, h]`` the log decay (``<= 0``), ``beta`` ``[b, s, h]`` the
    write strength. ``initial_state`` ``[b, h, dk, dv]`` is the state before the first token.
    ``seq_idx`` ``[b, s]`` (integers, nondecreasing) packs several sequences in a row: the state
    restarts from zero wherever it changes (``initial_state`` seeds only the first sequence), by
    masking the decays that would cross a boundary, so each sequence is computed exactly as if
    alone. ``s`` need not be a multiple of ``chunk_size``.

    Returns ``o`` ``[b, s, h, dv]`` in ``v.dtype`` and, with ``return_final_state``, the state
    after the last token ``[b, h, dk, dv]`` in fp32 (fp64 for fp64 inputs); with ``seq_idx``
    that is the state of the row's last sequence.
    """
    check_inputs(q, k, v, g, beta, chunk_size, initial_state, seq_idx)
    b, s, h, dk = q.shape
    dv = v.shape[-1]
    dtype = compute_dtype(q, k, v, g, beta, initial_state)
    out_dtype = v.dtype
    if initial_state is None:
        state = torch.zeros(b, h, dk, dv, dtype=dtype, device=v.device)
    else:
        state = initial_state.to(dtype)
    if s == 0:
        out = v.new_empty(b, 0, h, dv)
        return (out, state) if return_final_state else out

    q, k = normalize_qk(q, k, use_qk_l2norm, scale, dtype)
    # [b, h, s, ...]: the heads become batch dims of every matmul below.
    q, k, v = (x.transpose(1, 2).to(dtype) for x in (q, k, v))
    g, beta = (x.transpose(1, 2).to(dtype) for x in (g, beta))

    # Pad to whole chunks with tokens that change nothing: k = v = beta = 0 and g = 0.
    size = chunk_size
    chunks = -(-s // size)
    pad = chunks * size - s
    q, k, v = (F.pad(x, (0, 0, 0, pad)).unflatten(2, (chunks, size)) for x in (q, k, v))
    g, beta = (F.pad(x, (0, pad)).unflatten(2, (chunks, size)) for x in (g, beta))

    # Log decay from the chunk's start through each token, and between token pairs (i <= t).
    log_decay = g.cumsum(-1)  # [b, h, n, c]
    pairs = log_decay[..., :, None] - log_decay[..., None, :]  # [b, h, n, c, c], <= 0 for i <= t
    causal = torch.ones(size, size, dtype=torch.bool, device=v.device).tril()
    last = log_decay[..., -1:]  # through the whole chunk (pad tokens add g = 0)
    if seq_idx is None:
        pair_mask, from_start, to_end = causal, None, None
    else:
        seg = segment_ids(seq_idx)
        seg = torch.cat([seg, seg[:, -1:].expand(b, pad)], 1).view(b, 1, chunks, size)
        # The state entering a chunk belongs to the token before it (the first sequence for
        # chunk 0); decays count only between tokens of one sequence.
        before = torch.cat([seg[..., :1, :1], seg[..., :-1, -1:]], 2)  # [b, 1, n, 1]
        pair_mask = causal & (seg[..., :, None] == seg[..., None, :])
        from_start = seg == before
        to_end = seg == seg[..., -1:]
    pair_decay = torch.where(pair_mask, pairs, -torch.inf).exp()
    start_decay = _masked_exp(log_decay, from_start)  # S_0 -> token t
    end_decay = _masked_exp(last - log_decay, to_end)  # token t -> end of chunk
    chunk_decay = _masked_exp(last, None if from_start is None else from_start[..., -1:])

    # Token t's write is u_t = beta_t (v_t - Sbar_t^T k_t), Sbar_t the decayed state before it;
    # unrolled inside the chunk, (I + A) u = beta v - beta start_decay k S_0 with A strictly lower,
    # A[t, i] = beta_t decay(i -> t) k_t . k_i, so u = U0 - W S_0 after one triangular solve.
    bk = beta[..., None] * k
    system = (bk @ k.transpose(-1, -2) * pair_decay).tril(-1)
    rhs = torch.cat([beta[..., None] * v, bk * start_decay[..., None]], -1)
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    u0, w = solved.split([dv, dk], -1)
    # o_t = start_decay_t S_0^T q_t + sum_{i <= t} decay(i -> t) (q_t . k_i) u_i.
    attn = q @ k.transpose(-1, -2) * pair_decay
    reads = torch.cat([w, q * start_decay[..., None]], -2)  # one matmul with S_0 for both
    k_end = (k * end_decay[..., None]).transpose(-1, -2)

    outs = []
    for n in range(chunks):
        w_s, q_s = (reads[:, :, n] @ state).split(size, -2)
        u = u0[:, :, n] - w_s
        outs.append(q_s + attn[:, :, n] @ u)
        state = chunk_decay[:, :, n, :, None] * state + k_end[:, :, n] @ u
    out = torch.stack(outs, 2).flatten(2, 3)[:, :, :s].transpose(1, 2).to(out_dtype)
    return (out, state) if return_final_state else out


def _masked_exp(log_decay: Tensor, keep: Tensor | None) -> Tensor:
    """``exp(log_decay)``, zero where ``keep`` is False (a sequence boundary lies between)."""
    if keep is None:
        return log_decay.exp()
    return torch.where(keep, log_decay, -torch.inf).exp()


def gated_delta_step(
    state: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    use_qk_l2norm: bool = True,
    scale: float | None = None,
) -> Tensor:
    """One token of the gated delta rule, for decoding: updates ``state`` in place.

    ``state`` ``[b, h, dk, dv]`` (fp32; it must not require grad), ``q``, ``k`` ``[b, h, dk]``,
    ``v`` ``[b, h, dv]``, ``g``, ``beta`` ``[b, h]``. Returns ``o`` ``[b, h, dv]`` in ``v.dtype``.
    The arithmetic is in the state's dtype. No host syncs, so it can be captured in a CUDA graph.
    """
    b, h, dk, dv = state.shape
    if q.shape != (b, h, dk) or k.shape != (b, h, dk) or v.shape != (b, h, dv):
        raise ValueError(
            f"state {tuple(state.shape)} needs q, k [b, h, dk] and v [b, h, dv]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if g.shape != (b, h) or beta.shape != (b, h):
        raise ValueError(f"g and beta must be [b, h], got {tuple(g.shape)}, {tuple(beta.shape)}")
    dtype = state.dtype
    q, k = normalize_qk(q, k, use_qk_l2norm, scale, dtype)
    state.mul_(g.to(dtype).exp()[..., None, None])
    predicted = (k[..., None, :] @ state).squeeze(-2)  # S^T k: what the state already says
    delta = beta.to(dtype)[..., None] * (v.to(dtype) - predicted)
    state.add_(k[..., :, None] * delta[..., None, :])
    return (q[..., None, :] @ state).squeeze(-2).to(v.dtype)
