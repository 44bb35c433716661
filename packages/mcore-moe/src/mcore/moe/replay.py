"""Router replay: record every MoE layer's routing in one forward, replay it exactly later.

Reinforcement learning recomputes log-probabilities of sampled tokens with the training model;
if routing there differs from routing during generation (other batch shapes, other kernels,
updated weights), the two log-probabilities diverge. Replaying the recorded expert choices makes
the recomputation use the same experts (only the probabilities of those experts are recomputed,
so gradients still reach the router).

    replay = RouterReplay(model)
    with replay.record():
        model(tokens)          # routing decisions are stored per layer, per forward
    with replay.replay():
        model(tokens)          # the same experts, in the same order of forwards

Recorded decisions can be moved between processes with ``state_dict``/``load_state_dict``.
A model with full-layer recompute runs each layer's forward twice; it is refused here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class ReplaySlot:
    """One MoE layer's recorded routing decisions and where replay has got to."""

    def __init__(self) -> None:
        self.mode: str | None = None
        self.records: list[torch.Tensor] = []
        self.cursor = 0

    def next_indices(self) -> torch.Tensor | None:
        """The indices to replay in this forward, or None when not replaying."""
        if self.mode != "replay":
            return None
        if self.cursor >= len(self.records):
            raise RuntimeError(
                f"router replay: this layer was recorded {len(self.records)} time(s) and is "
                "being run once more; replay the same sequence of forwards that was recorded"
            )
        self.cursor += 1
        return self.records[self.cursor - 1]

    def record(self, indices: torch.Tensor) -> None:
        if self.mode == "record":
            self.records.append(indices.detach().clone())


class RouterReplay:
    """Record and replay the routing of every MoE layer of ``model``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.slots: dict[str, ReplaySlot] = {
            name: slot
            for name, module in model.named_modules()
            if isinstance(slot := getattr(module, "replay", None), ReplaySlot)
        }
        if not self.slots:
            raise ValueError("router replay: the model has no MoE layers")
        for module in model.modules():
            if getattr(module, "recompute_layers", False):
                raise ValueError(
                    "router replay cannot follow full-layer recompute, which runs each forward "
                    "twice; set model.recompute_granularity to 'selective' or unset"
                )

    @contextmanager
    def record(self) -> Iterator[RouterReplay]:
        """Forwards inside store their routing decisions (earlier records are dropped)."""
        for slot in self.slots.values():
            slot.records, slot.mode = [], "record"
        try:
            yield self
        finally:
            for slot in self.slots.values():
                slot.mode = None

    @contextmanager
    def replay(self) -> Iterator[RouterReplay]:
        """Forwards inside route exactly as recorded, in the recorded order."""
        for slot in self.slots.values():
            slot.cursor, slot.mode = 0, "replay"
        try:
            yield self
        finally:
            for slot in self.slots.values():
                slot.mode = None

    def state_dict(self) -> dict[str, list[torch.Tensor]]:
        """The recorded indices of every layer (tensors only: safe to save and load)."""
        return {name: list(slot.records) for name, slot in self.slots.items()}

    def load_state_dict(self, state: dict[str, list[torch.Tensor]]) -> None:
        """Take decisions recorded elsewhere (e.g. by the inference engine's copy)."""
        missing = sorted(set(self.slots) - set(state))
        if missing:
            raise KeyError(f"router replay: no recorded routing for layers {missing[:4]}")
        for name, slot in self.slots.items():
            slot.records, slot.cursor = list(state[name]), 0
