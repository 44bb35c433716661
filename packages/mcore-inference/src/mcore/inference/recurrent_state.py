"""Recurrent state of hybrid models at inference: its memory, and which slot each request holds.

Sequence-mixer layers (Mamba-2 ``M``, gated delta net ``G``) keep a fixed-size state per request
instead of keys/values per token. The engine keeps, per such layer, tensors ``[num_slots,
*shape]`` (:class:`~mcore.models.inference.RecurrentStateSpec`); a running request owns one
slot from admission to its end. Slot 0 is scratch: the padding rows of a CUDA-graph-padded
batch read and write it, and no request ever gets it, so ``num_slots = max_requests + 1``.

A slot must hold zeros before the request's first token is computed; :class:`StateSlots`
records the slots handed out since the last step, and the context zeroes them (one fill per
tensor) before the next forward. A preempted request gives its slot back; when readmitted it
recomputes its tokens from zeros in whatever slot it gets.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mcore.inference.errors import RequestId
from mcore.models.inference import RecurrentStateSpec

SCRATCH_SLOT = 0
"""The state slot padding rows use; never given to a request."""


@dataclass(frozen=True)
class RecurrentStateConfig:
    """The recurrent-state memory of a hybrid model (cf. Megatron's
    ``MambaInferenceStateConfig``): per-layer specs, slots, dtypes and bytes."""

    layers: Mapping[int, RecurrentStateSpec]
    """What each sequence-mixer layer keeps per request, by layer number."""
    num_slots: int
    """``max_requests + 1``: one slot per running request, and the scratch slot 0."""
    dtype: torch.dtype
    """The model dtype: tensors not marked ``float32`` in their spec are kept in it."""

    @classmethod
    def from_model(
        cls, model: torch.nn.Module, *, max_requests: int, dtype: torch.dtype
    ) -> RecurrentStateConfig | None:
        """The config of ``model``'s ``recurrent_state_specs()``; None when it has no
        sequence-mixer layers (or no such method)."""
        specs_of = getattr(model, "recurrent_state_specs", None)
        specs: Any = specs_of() if callable(specs_of) else None
        if not specs:
            return None
        return cls(layers=dict(specs), num_slots=max_requests + 1, dtype=dtype)

    @property
    def max_requests(self) -> int:
        return self.num_slots - 1

    def dtypes(self, spec: RecurrentStateSpec) -> tuple[torch.dtype, ...]:
        """The dtype of each of a layer's state tensors."""
        return tuple(torch.float32 if wide else self.dtype for wide in spec.float32)

    def bytes_per_request(self) -> int:
        """Bytes one slot takes over all layers."""
        total = 0
        for spec in self.layers.values():
            for shape, dtype in zip(spec.shapes, self.dtypes(spec), strict=True):
                total += _numel(shape) * torch.empty((), dtype=dtype).element_size()
        return total

    def total_bytes(self) -> int:
        """Bytes of all the state tensors (every slot, scratch included)."""
        return self.num_slots * self.bytes_per_request()

    def allocate(self, device: torch.device | str) -> dict[int, tuple[torch.Tensor, ...]]:
        """Zeroed state tensors ``[num_slots, *shape]`` by layer number."""
        return {
            layer: tuple(
                torch.zeros((self.num_slots, *shape), dtype=dtype, device=device)
                for shape, dtype in zip(spec.shapes, self.dtypes(spec), strict=True)
            )
            for layer, spec in self.layers.items()
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain types, for logs and metrics."""
        return {
            "layers": sorted(self.layers),
            "num_slots": self.num_slots,
            "bytes_per_request": self.bytes_per_request(),
            "total_bytes": self.total_bytes(),
        }

    def describe(self) -> str:
        """One line for the log."""
        return (
            f"{len(self.layers)} recurrent-state layers, {self.num_slots - 1} request slots of "
            f"{self.bytes_per_request() / 2**20:.2f} MiB (+1 scratch): "
            f"{self.total_bytes() / 2**30:.3f} GiB"
        )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class StateSlots:
    """Which state slot each running request holds (host bookkeeping; the tensors live in
    the context). The lowest free slot is handed out first."""

    def __init__(self, num_slots: int) -> None:
        if num_slots < 2:
            raise ValueError(f"need at least 2 state slots (one is scratch), got {num_slots}")
        self.num_slots = num_slots
        self._free = list(range(1, num_slots))  # a heap (sorted is one)
        self._by_request: dict[RequestId, int] = {}
        self._to_zero: list[int] = []

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_in_use(self) -> int:
        return len(self._by_request)

    def assign(self, request_id: RequestId) -> int:
        """Give ``request_id`` a free slot, to be zeroed before the next forward."""
        if request_id in self._by_request:
            raise RuntimeError(f"request {request_id!r} already holds a state slot")
        if not self._free:
            raise RuntimeError("no free recurrent-state slot: the scheduler admitted too many")
        slot = heapq.heappop(self._free)
        self._by_request[request_id] = slot
        self._to_zero.append(slot)
        return slot

    def free(self, request_id: RequestId) -> None:
        """Give back the slot of ``request_id`` (nothing if it holds none)."""
        slot = self._by_request.pop(request_id, None)
        if slot is not None:
            heapq.heappush(self._free, slot)

    def slot(self, request_id: RequestId) -> int:
        try:
            return self._by_request[request_id]
        except KeyError:
            raise KeyError(f"request {request_id!r} holds no recurrent-state slot") from None

    def get(self, request_id: RequestId) -> int | None:
        return self._by_request.get(request_id)

    def in_use(self) -> list[int]:
        """Every slot a request holds, ascending."""
        return sorted(self._by_request.values())

    def take_to_zero(self) -> list[int]:
        """The slots handed out since the last call (they must be zeroed now)."""
        slots, self._to_zero = self._to_zero, []
        return slots
