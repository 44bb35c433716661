"""Sharded state dicts: every tensor of a rank as pieces of one global, layout-free tensor.

A checkpoint must load under another parallel layout, so it stores each tensor in a form no
layout shapes: the *global* tensor (the weight the single-process model has), of which each
rank writes the pieces it holds, each at its offset. This module describes those pieces; the
formats in mcore-ckpt write and read them.

Three layers of sharding compose:

1. **Tensor, expert and pipeline parallel** (what a module holds): a module maps its local
   tensor into the global one by a :class:`Layout`, a list of rectangles (:class:`Part`) each
   placed at a global offset. A column-parallel QKV weight ``[q/tp | k/tp | v/tp]`` has three
   parts; stacked expert weights under EP sit at ``ep_rank * local_experts`` along dim 0.
   Modules that split a tensor say so with ``shard_layout(name)``; everything else is
   replicated (one part, offset 0). Pipeline stages need nothing: layers keep global names.
2. **Fully sharded data parallel**: a ``DTensor`` parameter holds a chunk of the module's local
   tensor (its ``__create_chunk_list__``), so this rank holds only that region of it.
3. **The distributed optimizer**: it owns a flat range of a parameter, which
   :func:`flat_range_regions` cuts into row-major contiguous boxes.

:func:`pieces` intersects what a rank holds (layers 2 and 3) with the layout (layer 1); each
piece is a *view* of the rank's own storage, so saving reads it and loading writes into it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeGuard, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

Shape = tuple[int, ...]


def is_dtensor(tensor: object) -> TypeGuard[DTensor]:
    """Whether ``tensor`` is a ``DTensor``, without importing ``torch.distributed.tensor``
    (seconds of start-up): when nothing imported it, no tensor can be one."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


@dataclass(frozen=True)
class Part:
    """A box of the local tensor (``local_offset``, ``size``) and where it sits globally."""

    local_offset: Shape
    size: Shape
    global_offset: Shape


@dataclass(frozen=True)
class Layout:
    """How a module's local tensor maps into the global tensor: disjoint boxes."""

    global_shape: Shape
    parts: tuple[Part, ...]

    @classmethod
    def replicated(cls, shape: Sequence[int]) -> Layout:
        """The local tensor is the whole global tensor (held alike by every rank)."""
        shape = tuple(shape)
        zero = (0,) * len(shape)
        return cls(shape, (Part(zero, shape, zero),))

    @classmethod
    def split(
        cls, local_shape: Sequence[int], splits: dict[int, tuple[int, int, Sequence[int] | None]]
    ) -> Layout:
        """A local tensor that is this rank's share along the dims of ``splits``.

        ``splits[dim] = (rank, size, parts)``: this rank is ``rank`` of ``size`` along ``dim``.
        ``parts`` are the *local* sizes of consecutive blocks along it that are each split over
        the ranks on their own (fused projections: ``[q/tp, k/tp, v/tp]``); ``None`` is one
        block. Several dims compose (stacked experts: EP along dim 0, ETP along another).
        """
        local_shape = tuple(local_shape)
        global_shape = list(local_shape)
        per_dim: dict[int, list[tuple[int, int, int]]] = {}  # dim -> [(local, global, length)]
        for dim, (rank, size, parts) in splits.items():
            parts = list(parts) if parts is not None else [local_shape[dim]]
            if sum(parts) != local_shape[dim]:
                raise ValueError(f"parts {parts} do not sum to dim {dim} of {local_shape}")
            global_shape[dim] = sum(parts) * size
            blocks, local_start, global_start = [], 0, 0
            for length in parts:
                blocks.append((local_start, global_start + rank * length, length))
                local_start += length
                global_start += length * size
            per_dim[dim] = blocks
        boxes = [((0,) * len(local_shape), local_shape, (0,) * len(local_shape))]
        for dim, blocks in per_dim.items():
            grown = []
            for local_offset, size, global_offset in boxes:
                for local_start, global_start, length in blocks:
                    lo, sz, go = list(local_offset), list(size), list(global_offset)
                    lo[dim], sz[dim], go[dim] = local_start, length, global_start
                    grown.append((tuple(lo), tuple(sz), tuple(go)))
            boxes = grown
        return cls(tuple(global_shape), tuple(Part(*box) for box in boxes))


@dataclass
class ShardedTensor:
    """This rank's pieces of one global tensor: views of its storage, each at a global offset.

    Pieces of ranks that hold the same data (replicas) have the same offsets; a checkpoint
    format writes such a piece once.
    """

    key: str
    global_shape: Shape
    dtype: torch.dtype
    pieces: list[tuple[torch.Tensor, Shape]] = field(default_factory=list)

    @property
    def local_numel(self) -> int:
        return sum(t.numel() for t, _ in self.pieces)


def _intersect(
    a_offset: Shape, a_size: Shape, b_offset: Shape, b_size: Shape
) -> tuple[Shape, Shape] | None:
    lo = tuple(max(x, y) for x, y in zip(a_offset, b_offset, strict=True))
    hi = tuple(
        min(x + s, y + t) for x, s, y, t in zip(a_offset, a_size, b_offset, b_size, strict=True)
    )
    if any(h <= low for h, low in zip(hi, lo, strict=True)) and len(lo) > 0:
        return None
    return lo, tuple(h - low for h, low in zip(hi, lo, strict=True))


def _box(tensor: torch.Tensor, offset: Shape, size: Shape) -> torch.Tensor:
    for dim, (start, length) in enumerate(zip(offset, size, strict=True)):
        tensor = tensor.narrow(dim, start, length)
    return tensor


def pieces(
    layout: Layout, regions: Iterable[tuple[torch.Tensor, Shape]]
) -> list[tuple[torch.Tensor, Shape]]:
    """What a rank holds (``regions``: views of boxes of the module's local tensor, each at its
    local offset) cut by the layout's parts into pieces of the global tensor."""
    out = []
    for data, region_offset in regions:
        region_size = tuple(data.shape)
        for part in layout.parts:
            hit = _intersect(region_offset, region_size, part.local_offset, part.size)
            if hit is None:
                continue
            offset, size = hit
            if math.prod(size) == 0 and len(size) > 0:
                continue
            view = _box(
                data, tuple(o - r for o, r in zip(offset, region_offset, strict=True)), size
            )
            global_offset = tuple(
                g + o - p
                for g, o, p in zip(part.global_offset, offset, part.local_offset, strict=True)
            )
            out.append((view, global_offset))
    return out


def held_region(tensor: torch.Tensor) -> tuple[torch.Tensor, Shape]:
    """The part of a (module-local) tensor this rank holds: a ``DTensor``'s local chunk at its
    offset, or the whole tensor."""
    if is_dtensor(tensor):
        (chunk,) = tensor.__create_chunk_list__()
        # untracked: loading writes into it in place
        local = cast("DTensor", tensor.detach()).to_local()
        return local.view(tuple(chunk.sizes)), tuple(chunk.offsets)
    return tensor, (0,) * tensor.dim()


def flat_range_regions(
    flat: torch.Tensor, shape: Shape, start: int, base_offset: Shape | None = None
) -> list[tuple[torch.Tensor, Shape]]:
    """Cut ``flat`` (elements ``[start, start + flat.numel())`` of a row-major tensor of
    ``shape``) into boxes, each a contiguous stretch and so a view of ``flat``.

    At most ``2 * ndim - 1`` boxes: finish the innermost dim, then complete ever larger
    blocks, then the mirror image toward the end. ``base_offset`` shifts the boxes (the
    region of the whole tensor that ``shape`` is, e.g. a DTensor chunk).
    """
    base = base_offset or (0,) * len(shape)
    end = start + flat.numel()
    if not shape:
        return [(flat.view(()), ())] if flat.numel() else []
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    out: list[tuple[torch.Tensor, Shape]] = []
    pos = start
    while pos < end:
        # The largest block starting at pos: step dim d may span whole sub-blocks below it.
        d = len(shape) - 1
        while d > 0 and pos % strides[d - 1] == 0 and pos + strides[d - 1] <= end:
            d -= 1
        index = []
        rest = pos
        for s in strides:
            index.append(rest // s)
            rest %= s
        count = min((end - pos) // strides[d], shape[d] - index[d])
        size = [1] * d + [count] + list(shape[d + 1 :])
        numel = count * strides[d]
        view = flat[pos - start : pos - start + numel].view(size)
        out.append((view, tuple(b + i for b, i in zip(base, index, strict=True))))
        pos += numel
    return out


def layout_of(root: nn.Module, name: str, tensor: torch.Tensor) -> Layout:
    """The layout of ``root``'s tensor ``name`` (a parameter or buffer key): asked of the owning
    module, then of its parents (a module may describe tensors of plain child containers, as
    the grouped experts do), else replicated."""
    atoms = name.split(".")
    shape = tuple(tensor.shape)
    for depth in range(len(atoms) - 1, -1, -1):
        module = root.get_submodule(".".join(atoms[:depth]))
        describe = getattr(module, "shard_layout", None)
        if describe is not None:
            layout = describe(".".join(atoms[depth:]))
            if layout is not None:
                return layout
    return Layout.replicated(shape)


def checkpoint_key(name: str, tensor: torch.Tensor) -> str:
    """The key a tensor is stored under: its name, unless it is one stage's copy of another
    tensor (``param.checkpoint_key``, e.g. the tied output embedding of the last stage)."""
    return getattr(tensor, "checkpoint_key", None) or name


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside data-parallel wrappers that keep it as ``.module`` and add nothing."""
    while True:
        inner = getattr(module, "module", None)
        if not isinstance(inner, nn.Module):
            return module
        if sum(1 for _ in module.parameters()) != sum(1 for _ in inner.parameters()):
            return module
        module = inner


def model_sharded_tensors(chunks: Sequence[nn.Module]) -> dict[str, ShardedTensor]:
    """Every parameter and persistent buffer of this rank's model chunks, as global tensors.

    Keys are the state-dict names (global for pipeline stages: layer ``17`` is ``layers.17``
    on whatever stage holds it).
    """
    out: dict[str, ShardedTensor] = {}
    for chunk in chunks:
        model = unwrap(chunk)
        for name, tensor in model.state_dict(keep_vars=True).items():
            if tensor is None:
                continue
            layout = layout_of(model, name, tensor)
            key = checkpoint_key(name, tensor)
            region = held_region(tensor if is_dtensor(tensor) else tensor.detach())
            entry = out.setdefault(key, ShardedTensor(key, layout.global_shape, tensor.dtype))
            if entry.global_shape != layout.global_shape:
                raise ValueError(
                    f"{key!r} is held with global shapes {entry.global_shape} and "
                    f"{layout.global_shape} by two model chunks of this rank"
                )
            entry.pieces += pieces(layout, [region])
    return out


def named_layouts(chunks: Sequence[nn.Module]) -> dict[int, tuple[str, Layout]]:
    """``id(tensor) -> (checkpoint key, layout)`` for every parameter of the chunks (what an
    optimizer needs to place its state, which it keeps per parameter)."""
    out: dict[int, tuple[str, Layout]] = {}
    for chunk in chunks:
        model = unwrap(chunk)
        for name, tensor in model.named_parameters():
            out[id(tensor)] = (checkpoint_key(name, tensor), layout_of(model, name, tensor))
    return out
