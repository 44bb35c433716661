"""The coordinator's wire format: msgpack maps with a ``type`` key, never pickle.

Engine ranks and clients are ZMQ DEALER sockets; the coordinator is a ROUTER. Every frame is
one msgpack map of plain types (ints, floats, strings, lists, maps), so a message from a
misbehaving peer can at worst be malformed, never execute code.

engine -> coordinator
    ``register {rank, pid}``, ``heartbeat``, ``output {rid, ...delta}``, ``ack {cid}``,
    ``goodbye`` (leaving without a STOP)
coordinator -> engine
    ``registered {engine}``, ``submit {rid, prompt_token_ids, sampling_params}``,
    ``abort {rid}``, ``control {cid, signal}``
client -> coordinator
    ``hello``, ``submit {rid, prompt_token_ids, sampling_params}``, ``abort {rid}``,
    ``control {cid, signal}``, ``status {cid}``
coordinator -> client
    ``hello {engines}``, ``output {rid, engine_rank, ...delta}``,
    ``control_done {cid, signal, engines}``, ``status {cid, engines}``, ``error {message}``

An ``output`` carries what is new since the previous one (``token_ids``, ``logprobs``,
``top_logprobs``, ``text``) and, when ``finished``, the ``finish_reason``, ``stop_reason``,
``error`` and ``metrics``. A request the engine refused has ``rejected`` set, with the
``error_type`` and ``field`` of the error.
"""

from __future__ import annotations

import enum
from typing import Any, cast

import msgpack

from mcore.inference.errors import InferenceError


class Signal(enum.StrEnum):
    """Control signals the coordinator broadcasts; each is done once every rank acked it."""

    PAUSE = "PAUSE"
    """Stop stepping; requests stay queued (new ones are queued too)."""
    UNPAUSE = "UNPAUSE"
    SUSPEND = "SUSPEND"
    """Free the KV cache, keeping every request's state (RL lends the memory to training)."""
    RESUME = "RESUME"
    STOP = "STOP"
    """Abort what is in flight and exit; the coordinator shuts down after reporting it."""


class ProtocolError(InferenceError):
    """A frame that is not a msgpack map with a known ``type``."""


def pack(kind: str, **fields: Any) -> bytes:
    return cast(bytes, msgpack.packb({"type": kind, **fields}, use_bin_type=True))


def unpack(frame: bytes) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as exc:
        raise ProtocolError(f"not a msgpack message: {exc}") from exc
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError(f"a message must be a map with a 'type' string, got {message!r:.80}")
    return message
