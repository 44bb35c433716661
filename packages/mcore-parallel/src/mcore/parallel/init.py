"""Build on ``meta``, then give each rank only what it holds: layout-free, seeded initialisation.

A model is first built on the ``meta`` device (no storage, no random draws). Every parameter
carries its *init recipe* (:func:`set_init`, the ``mcore_init`` attribute). :func:`materialize`
then allocates each rank's tensors on the real device and fills exactly the region of the
*global* tensor the rank holds (its TP/SP slice, EP/ETP experts, FSDP chunk: whatever
:mod:`mcore.parallel.sharding` says), so no rank ever allocates a full copy of a sharded tensor.

One seed still gives the same full model under every layout because the random values are
*counter-based*: the global tensor, viewed as ``[rows, last dim]``, is cut into fixed tiles of
:data:`TILE` elements, and each tile is drawn from its own generator seeded by
``(seed, tensor key, tile row, tile column)``. A rank draws only the tiles its region touches and
keeps their intersection with it, so its scratch is one strip of tiles, never a full tensor.
The tensor key is its checkpoint key (global under pipeline parallelism: ``layers.17...`` on
whichever stage holds layer 17), so a tied output layer on the last stage, whose key is
``embedding.weight``, draws the first stage's table.

Random recipes are applied to each tile, so they must be elementwise (normal or uniform with a
fixed scale, as mcore's are); one that reads its tensor's shape (xavier, kaiming) sees the tile's.
Values are drawn in fp32 on the CPU and then cast, so they do not depend on the device or dtype.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
from torch import nn

from mcore.parallel.sharding import (
    Layout,
    checkpoint_key,
    held_region,
    is_dtensor,
    layout_of,
    pieces,
    unwrap,
)

TILE = (256, 256)
"""Rows and columns of one independently seeded block of a global tensor's 2-D view."""

INIT_ATTR = "mcore_init"
"""The parameter attribute holding its :class:`Init` (public, so wrappers that replace
parameters, such as megatron-fsdp's, carry it over)."""


INIT_PENDING = "init_pending"
"""Set by a data-parallel wrapper on the shards it allocated for ``meta`` tensors (megatron-fsdp
does): they hold no values yet, and :func:`materialize` fills them."""


@dataclass(frozen=True)
class Init:
    """How a tensor starts: ``fill(tensor)`` in place, random (drawn per tile) or constant."""

    fill: Callable[[torch.Tensor], Any]
    random: bool = True


ZEROS = Init(nn.init.zeros_, random=False)
ONES = Init(nn.init.ones_, random=False)


def as_init(method: Init | Callable[[torch.Tensor], Any]) -> Init:
    """An :class:`Init` from an init method (``fill(tensor)``, taken as random)."""
    return method if isinstance(method, Init) else Init(method)


_T = TypeVar("_T", bound=torch.Tensor)


def set_init(tensor: _T, method: Init | Callable[[torch.Tensor], Any]) -> _T:
    """Record how ``tensor`` (a parameter or buffer) is initialised; returns it."""
    setattr(tensor, INIT_ATTR, as_init(method))
    return tensor


def get_init(tensor: torch.Tensor) -> Init | None:
    """The recipe :func:`set_init` recorded, if any."""
    return getattr(tensor, INIT_ATTR, None)


# -- counter-based draws --------------------------------------------------------------------


def _mix(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit value from any 64-bit integer."""
    x &= 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def _key_seed(seed: int, key: str) -> int:
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _view_2d(shape: Sequence[int]) -> tuple[int, int]:
    """A global tensor as ``[rows, columns]``: its last dim is the columns (0-d: one cell)."""
    if not shape:
        return 1, 1
    return math.prod(shape[:-1]), shape[-1]


class _Tiles:
    """The values of one global tensor, tile by tile, each tile from its own seed."""

    def __init__(self, shape: Sequence[int], seed: int, key: str, init: Init) -> None:
        self.rows, self.cols = _view_2d(tuple(shape))
        self.base = _key_seed(seed, key)
        self.init = init

    def strip(self, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        """Global rows ``[r0, r1)`` x columns ``[c0, c1)``, within one tile row (fp32, CPU)."""
        tr, tc = TILE
        row_tile = r0 // tr
        t_r0 = row_tile * tr
        t_r1 = min(t_r0 + tr, self.rows)
        out = torch.empty(r1 - r0, c1 - c0, dtype=torch.float32)
        for col_tile in range(c0 // tc, (c1 - 1) // tc + 1):
            t_c0 = col_tile * tc
            t_c1 = min(t_c0 + tc, self.cols)
            tile = torch.empty(t_r1 - t_r0, t_c1 - t_c0, dtype=torch.float32)
            torch.default_generator.manual_seed(
                _mix(self.base ^ _mix((row_tile << 32) ^ col_tile)) >> 1
            )
            self.init.fill(tile)
            a, b = max(c0, t_c0), min(c1, t_c1)
            out[:, a - c0 : b - c0] = tile[r0 - t_r0 : r1 - t_r0, a - t_c0 : b - t_c0]
        return out


def _fill_2d(target: torch.Tensor, tiles: _Tiles, row0: int, col0: int) -> None:
    """Fill a 2-D ``target`` holding global rows ``row0..`` and columns ``col0..``."""
    rows, cols = target.shape
    tr = TILE[0]
    r = row0
    while r < row0 + rows:
        r_end = min((r // tr + 1) * tr, row0 + rows)
        strip = tiles.strip(r, r_end, col0, col0 + cols)
        target[r - row0 : r_end - row0].copy_(strip)
        r = r_end


def _fill_box(
    target: torch.Tensor,
    global_shape: Sequence[int],
    global_offset: Sequence[int],
    tiles: _Tiles,
    row_prefix: int = 0,
) -> None:
    """Fill ``target``, the box of the global tensor at ``global_offset``, from ``tiles``.

    Leading dims beyond the last two are walked one index at a time, so every write is into a
    2-D view of ``target`` (which may be any strided view of the rank's storage).
    """
    ndim = len(global_shape)
    if ndim == 0:
        _fill_2d(target.view(1, 1), tiles, 0, 0)
    elif ndim == 1:
        _fill_2d(target.unsqueeze(0), tiles, 0, global_offset[0])
    elif ndim == 2:
        row0 = row_prefix * global_shape[0] + global_offset[0]
        _fill_2d(target, tiles, row0, global_offset[1])
    else:
        for i in range(target.shape[0]):
            prefix = row_prefix * global_shape[0] + global_offset[0] + i
            _fill_box(target[i], global_shape[1:], global_offset[1:], tiles, prefix)


@torch.no_grad()
def fill_pieces(
    regions: Iterable[tuple[torch.Tensor, Sequence[int]]],
    global_shape: Sequence[int],
    init: Init | Callable[[torch.Tensor], Any],
    *,
    seed: int,
    key: str,
) -> None:
    """Fill views of a rank's storage (``(view, global offset)`` pairs, as
    :func:`mcore.parallel.sharding.pieces` gives) with the global tensor's values there."""
    init = as_init(init)
    if not init.random:
        for view, _ in regions:
            init.fill(view)
        return
    tiles = _Tiles(global_shape, seed, key, init)
    with torch.random.fork_rng(devices=[]):
        for view, offset in regions:
            if view.numel():
                _fill_box(view, tuple(global_shape), tuple(offset), tiles)


def init_local(
    local: torch.Tensor,
    layout: Layout,
    init: Init | Callable[[torch.Tensor], Any],
    *,
    seed: int,
    key: str = "",
) -> torch.Tensor:
    """Fill ``local`` (a module's local tensor, mapped into the global one by ``layout``)."""
    zero = (0,) * local.dim()
    fill_pieces(pieces(layout, [(local, zero)]), layout.global_shape, init, seed=seed, key=key)
    return local


def init_tensor(
    tensor: torch.Tensor,
    method: Init | Callable[[torch.Tensor], Any],
    layout: Layout | None = None,
) -> torch.Tensor:
    """Record ``tensor``'s recipe and, unless it is on ``meta``, fill it now from a seed drawn
    from torch's global generator (``layout``: how it maps into the full tensor; default
    replicated). For parameters that modules create outside the tensor-parallel layers."""
    set_init(tensor, method)
    if not tensor.is_meta:
        layout = layout or Layout.replicated(tuple(tensor.shape))
        init_local(tensor.detach(), layout, method, seed=draw_seed())
    return tensor


def peek_seed() -> int:
    """The next number torch's global generator would draw, leaving it where it was: the
    default base seed of a model's weights, so ``torch.manual_seed(s)`` picks them."""
    with torch.random.fork_rng(devices=[]):
        return int(torch.randint(0, 2**62, (), device="cpu"))


def draw_seed() -> int:
    """A seed drawn from torch's global generator (advancing it), for a module built alone."""
    return int(torch.randint(0, 2**62, (), device="cpu"))


# -- materialisation ------------------------------------------------------------------------


def _allocate(module: nn.Module, device: torch.device) -> list[torch.Tensor]:
    """Give every ``meta`` parameter and buffer of ``module`` real (uninitialised) storage on
    ``device``, keeping its attributes; returns the new tensors."""
    fresh: list[torch.Tensor] = []
    replaced: dict[int, torch.Tensor] = {}  # a tensor registered in two places stays one
    for sub in module.modules():
        # Parameters and buffers alike: the tables' value types differ, the handling does not.
        tables = cast("tuple[dict[str, Any], ...]", (sub._parameters, sub._buffers))
        for table in tables:
            for name, t in table.items():
                if t is None or not t.is_meta:
                    continue
                new = replaced.get(id(t))
                if new is None:
                    data = torch.empty_like(t, device=device)
                    if isinstance(t, nn.Parameter):
                        new = nn.Parameter(data, requires_grad=t.requires_grad)
                    else:
                        new = data
                    vars(new).update(vars(t))
                    replaced[id(t)] = new
                    fresh.append(new)
                table[name] = new
    return fresh


def materialize(
    chunks: nn.Module | Sequence[nn.Module],
    *,
    device: torch.device | str | None = None,
    seed: int,
    initialize: bool = True,
) -> None:
    """Allocate and initialise, in place, what this rank holds of meta-built model chunks.

    Meta tensors get storage on ``device``; tensors that are already real but were never
    filled (a data-parallel wrapper's shards of meta parameters, marked by their recipe) are
    filled too. With ``initialize=False`` nothing is drawn: the weights are about to be loaded.
    A meta tensor without a recipe is an error naming it, since nothing would say its values.
    """
    chunks = [chunks] if isinstance(chunks, nn.Module) else list(chunks)
    device = torch.device(device) if device is not None else torch.get_default_device()
    pending: dict[int, torch.Tensor] = {}
    for chunk in chunks:
        for t in _allocate(chunk, device):
            pending[id(t)] = t
    if not initialize:
        for t in pending.values():
            _mark_done(t)
        return
    for chunk in chunks:
        model = unwrap(chunk)
        for name, tensor in model.state_dict(keep_vars=True).items():
            if tensor is None or getattr(tensor, "_mcore_initialized", False):
                continue
            init = get_init(tensor)
            fresh = id(tensor) in pending
            if init is None:
                if fresh:
                    raise ValueError(
                        f"{name!r} was built on the meta device without an init recipe, so "
                        "nothing says its initial values: record one with "
                        "mcore.parallel.init.set_init(tensor, method) where it is created"
                    )
                continue
            if not fresh and not _is_unfilled_shard(tensor):
                continue
            layout = layout_of(model, name, tensor)
            region = held_region(tensor if is_dtensor(tensor) else tensor.detach())
            fill_pieces(
                pieces(layout, [region]),
                layout.global_shape,
                init,
                seed=seed,
                key=checkpoint_key(name, tensor),
            )
            _mark_done(tensor)


def _mark_done(tensor: torch.Tensor) -> None:
    # private: wrappers that copy attributes do not carry it
    tensor._mcore_initialized = True  # pyright: ignore[reportAttributeAccessIssue]
    if getattr(tensor, INIT_PENDING, False):
        setattr(tensor, INIT_PENDING, False)


def _is_unfilled_shard(tensor: torch.Tensor) -> bool:
    """A wrapper's shard of a tensor that was still on ``meta`` when it was sharded."""
    return bool(getattr(tensor, INIT_PENDING, False))


def has_meta_tensors(module: nn.Module) -> bool:
    """Whether any parameter or buffer of ``module`` is still on the meta device."""
    tensors = [*module.parameters(), *module.buffers()]
    return any(t.is_meta for t in tensors)
