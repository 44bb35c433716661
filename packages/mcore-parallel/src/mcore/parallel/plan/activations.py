"""Activation memory of one micro-batch, measured by running a stage's forward and backward on
``meta`` tensors.

:class:`MetaRun` is a ``TorchDispatchMode`` that does two things while the model runs:

- it counts the bytes of every storage the ops create (parameters excluded), freeing them when
  torch frees them, so it sees exactly what autograd keeps for backward, what recompute
  re-creates and what is transient; the peak and the bytes alive after forward are the figures;
- it keeps *shadow* values of the small integer tensors (token counts, routing maps, split
  sizes) on the CPU, so the host synchronisations of MoE dispatch (``.tolist()``, ``.item()``,
  ``nonzero``) get real numbers although the data is ``meta``. Routing is made balanced: every
  ``topk``/``sort`` over meta scores yields the indices ``(row * k + j) mod n``, so each expert
  receives the same number of tokens; and under the fake process group, a collective over such
  integers sees every rank holding what this one holds (the same balance across ranks).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakTensorKeyDictionary

aten = torch.ops.aten

# Ops whose output shape depends on the data: computed on the shadows, returned as meta.
_DATA_DEPENDENT = {
    aten.nonzero.default,
    aten.masked_select.default,
    aten.bincount.default,
    aten.repeat_interleave.Tensor,
    aten._unique2.default,
    aten.unique_consecutive.default,
}
# Ops that choose indices by comparing (meta) scores: given balanced indices instead.
_CHOOSERS = {aten.topk.default, aten.sort.default, aten.sort.stable, aten.argsort.default}
# Ops that read only the shape of a float input (so a float meta input can be stood in for).
_SHAPE_ONLY = {
    aten.zeros_like.default,
    aten.ones_like.default,
    aten.empty_like.default,
    aten.full_like.default,
    aten.new_zeros.default,
    aten.new_ones.default,
    aten.new_empty.default,
    aten.new_full.default,
}


@dataclass
class ActivationFigures:
    """Bytes of one micro-batch's activations on one rank."""

    kept: int
    """Alive once forward is done: what the stage keeps until this micro-batch's backward."""
    peak: int
    """The most alive at once during forward and backward (kept plus the transient peak)."""


def _is_int(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex())


def _balanced_indices(shape: torch.Size, dim: int, n: int) -> torch.Tensor:
    """``[..., k, ...]`` indices into a dimension of size ``n``: ``(row * k + j) mod n``."""
    dim = dim % len(shape)
    k = shape[dim]
    moved = list(shape)
    moved.append(moved.pop(dim))
    rows = 1
    for s in moved[:-1]:
        rows *= s
    idx = (torch.arange(rows).unsqueeze(1) * k + torch.arange(k).unsqueeze(0)) % max(n, 1)
    return idx.reshape(moved).movedim(-1, dim).contiguous()


class MetaRun(TorchDispatchMode):
    """Track live storage bytes of meta tensors, with balanced shadow values (see module doc)."""

    def __init__(self, excluded: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self._excluded = {t.untyped_storage()._cdata for t in excluded}
        self._live: dict[int, int] = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self._shadow = WeakTensorKeyDictionary()

    # -- memory -------------------------------------------------------------------------------

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes

    def _track(self, out: Any) -> None:
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "meta":
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._excluded or key in self._live:
                continue
            self._live[key] = storage.nbytes()
            self.live_bytes += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live_bytes -= self._live.pop(key, 0)

    # -- shadows ------------------------------------------------------------------------------

    def _to_cpu(self, x: Any, *, stand_in: bool) -> Any:
        if isinstance(x, torch.device):
            return torch.device("cpu") if x.type == "meta" else x
        if not isinstance(x, torch.Tensor) or x.device.type != "meta":
            return x
        shadow = self._shadow.get(x)
        if shadow is not None:
            return shadow
        if stand_in:
            return torch.empty((), dtype=x.dtype).expand(x.shape)
        raise _NoShadow

    def _shadow_of(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """``func`` run on the CPU shadows of its arguments, or ``None`` if some is unknown."""
        stand_in = func in _SHAPE_ONLY
        try:
            cpu_args = tree_map(lambda x: self._to_cpu(x, stand_in=stand_in), args)
            cpu_kwargs = tree_map(lambda x: self._to_cpu(x, stand_in=stand_in), kwargs)
        except _NoShadow:
            return None
        if "device" in cpu_kwargs and cpu_kwargs["device"] is not None:
            cpu_kwargs["device"] = torch.device("cpu")
        return func(*cpu_args, **cpu_kwargs)

    def _attach(self, out: Any, shadow: Any) -> None:
        outs, shadows = tree_flatten(out)[0], tree_flatten(shadow)[0]
        for o, s in zip(outs, shadows, strict=False):
            meta_int = isinstance(o, torch.Tensor) and o.device.type == "meta" and _is_int(o)
            if meta_int and isinstance(s, torch.Tensor):
                self._shadow[o] = s

    def _host_value(self, t: torch.Tensor) -> torch.Tensor:
        shadow = self._shadow.get(t)
        if shadow is not None:
            return shadow
        if not _is_int(t):  # statistics read back for logging: their value does not matter
            return torch.zeros(t.shape, dtype=t.dtype)
        raise RuntimeError(
            "mcore plan: a data-dependent integer was read back from a meta tensor whose value "
            "the planner cannot know; this layer cannot be measured on meta tensors"
        )

    # -- dispatch -----------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "c10d":
            out = func(*args, **kwargs)
            _symmetric(func, args)
            return out
        first: Any = args[0] if args else None
        on_meta = isinstance(first, torch.Tensor) and first.device.type == "meta"
        if func is aten._local_scalar_dense.default and on_meta:
            return self._host_value(first).item()
        if func is aten._to_copy.default and on_meta:
            device = kwargs.get("device")
            if device is not None and torch.device(device).type == "cpu":
                value = self._host_value(first)
                return value.to(dtype=kwargs.get("dtype") or value.dtype, copy=True)
        if func in _DATA_DEPENDENT and on_meta:
            shadow = self._shadow_of(func, args, kwargs)
            if shadow is None:
                raise RuntimeError(f"mcore plan: {func} on a meta tensor of unknown value")
            out = tree_map(
                lambda s: torch.empty_like(s, device="meta") if isinstance(s, torch.Tensor) else s,
                shadow,
            )
            self._attach(out, shadow)
            self._track(out)
            return out
        out = func(*args, **kwargs)
        if func in _CHOOSERS and on_meta:
            indices = out if func is aten.argsort.default else out[1]
            dim = kwargs.get("dim", args[2] if len(args) > 2 else -1)
            if func is aten.sort.stable:
                dim = kwargs.get("dim", -1)
            self._shadow[indices] = _balanced_indices(indices.shape, dim, first.shape[dim])
        elif any(
            isinstance(o, torch.Tensor) and o.device.type == "meta" and _is_int(o)
            for o in tree_flatten(out)[0]
        ):
            shadow = self._shadow_of(func, args, kwargs)
            if shadow is not None:
                self._attach(out, shadow)
        self._track(out)
        return out


class _NoShadow(Exception):
    pass


@contextlib.contextmanager
def flash_attention_on_meta() -> Iterator[None]:
    """Run causal ``scaled_dot_product_attention`` on meta tensors as the flash kernel does on
    a GPU: it keeps the output and the log-sum-exp, not the ``s x s`` probabilities of the math
    fallback that meta tensors would otherwise take. Patched on the module rather than through
    a ``TorchFunctionMode`` because recompute runs in autograd's thread, where modes of this
    thread do not reach; tensors on other devices are untouched."""
    original = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if q.device.type != "meta" or attn_mask is not None:
            return original(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, **kw)
        flash = torch.ops.aten._scaled_dot_product_flash_attention
        return flash(q, k, v, dropout_p, is_causal, False, scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _symmetric(func: Any, args: tuple) -> None:
    """Under the fake process group a collective moves no data; for the CPU integers MoE
    dispatch exchanges (token counts), fill in what balanced peers would send: their own."""
    name = func.__name__.split(".")[0]
    if name == "_allgather_base_":
        out, inp = args[0], args[1]
        if out.device.type == "cpu":
            out.copy_(inp.reshape(-1).repeat(out.numel() // max(inp.numel(), 1)).view_as(out))


def measure_chunk(
    chunk: Any,
    *,
    micro_batch_size: int,
    seq_length: int,
    hidden_size: int,
    dtype: torch.dtype,
    sequence_parallel_tp: int,
    cp: int,
) -> ActivationFigures:
    """Run one micro-batch through ``chunk`` (a model chunk on ``meta``, in training mode) and
    back, and return the bytes its activations take on this rank.

    The chunk gets token ids if it holds the embedding, else the previous stage's hidden states
    ``[s / cp / tp_sp, b, h]``; it computes the loss if it holds the output layer, else its
    output is given a gradient as the next stage would send. Parameter gradients are dropped as
    soon as they are accumulated, as the data-parallel wrapper does (their memory is counted in
    the gradient buffers).
    """
    params = list(chunk.parameters())
    hooks = [
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        for p in params
        if p.requires_grad
    ]
    seq = seq_length // cp
    mode = MetaRun(excluded=[*params, *chunk.buffers()])
    try:
        with flash_attention_on_meta(), mode:
            # Every stage gets the tokens, as in training: the last one embeds them again
            # when the model has multi-token-prediction depths.
            ids = torch.zeros(micro_batch_size, seq, dtype=torch.long, device="meta")
            inputs = {"input_ids": ids}
            if not getattr(chunk, "pre_process", True):
                s_local = seq // sequence_parallel_tp
                hidden = torch.empty(
                    s_local, micro_batch_size, hidden_size, dtype=dtype, device="meta"
                ).requires_grad_()
                chunk.set_input_tensor(hidden)
            if getattr(chunk, "post_process", True):
                inputs["labels"] = torch.zeros(
                    micro_batch_size, seq, dtype=torch.long, device="meta"
                )
            out = chunk(**inputs)
            kept = mode.live_bytes
            if getattr(chunk, "post_process", True):
                out.float().mean().backward()
            else:
                out.backward(torch.empty_like(out))
            del out, inputs
            if hasattr(chunk, "set_input_tensor"):
                chunk.set_input_tensor(None)
            peak = mode.peak_bytes
    finally:
        for h in hooks:
            h.remove()
    return ActivationFigures(kept=kept, peak=peak)
