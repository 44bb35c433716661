"""Prove in a test that code reads nothing data-dependent back to the host.

A training step that reads a device tensor on the host (``.item()``, ``float(t)``,
``.tolist()``, ``if t:``, an op whose output size depends on the data such as ``nonzero``, a
copy to the CPU) waits for the device there and drains the queue of launched kernels. Such reads
hide well: on the CPU they cost nothing, so tests never notice them. Run the step on the
``meta`` device (tensors with shapes and dtypes but no data, so no GPU is needed) inside
:func:`forbid_host_syncs`, and every such read raises :class:`HostSyncError` naming the op:

    model.to("meta")
    with forbid_host_syncs():
        model(tokens.to("meta")).sum().backward()

Reading a CPU tensor (sizes built from Python ints, say) is allowed: it waits for nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncError", "forbid_host_syncs"]


class HostSyncError(RuntimeError):
    """Code read device data on the host, which waits for the device (a host sync)."""


_aten = torch.ops.aten
# Ops the host must wait for: a scalar read, or an output whose size is the data.
_READS = {
    _aten._local_scalar_dense.default: "a scalar read (.item(), .tolist(), float(t), bool(t))",
    _aten.nonzero.default: "nonzero (its output size depends on the data)",
    _aten.masked_select.default: "masked_select (its output size depends on the data)",
    _aten._unique2.default: "unique (its output size depends on the data)",
    _aten.unique_consecutive.default: "unique_consecutive (its output size depends on the data)",
    _aten.repeat_interleave.Tensor: "repeat_interleave by a tensor (its size is the data)",
}
_COPIES = (_aten._to_copy.default, _aten.copy_.default)


class _ForbidHostReads(TorchDispatchMode):
    """Raise on every op that reads device data on the host or copies it to the CPU."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READS and _on_device(args[0]):
            raise HostSyncError(f"host sync: {_READS[func]}, via {func}")
        if func in _COPIES and _device_to_host(func, args, kwargs):
            raise HostSyncError(f"host sync: a device tensor copied to the CPU, via {func}")
        return func(*args, **kwargs)


def _on_device(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type != "cpu"


def _device_to_host(func: Any, args: tuple, kwargs: dict) -> bool:
    if func is _aten.copy_.default:
        destination, source = args[0], args[1]
        return destination.device.type == "cpu" and _on_device(source)
    target = kwargs.get("device")
    return _on_device(args[0]) and target is not None and torch.device(target).type == "cpu"


@contextmanager
def forbid_host_syncs() -> Iterator[None]:
    """Inside, any op that reads device data on the host raises :class:`HostSyncError`."""
    with _ForbidHostReads():
        yield
