"""Megatron's hybrid layer-pattern grammar: one symbol per layer, plus stage and MTP separators.

``"M*-E|M-E*/*-"`` reads as: main layers ``M * - E`` on the first pipeline stage and ``M - E *``
on the second (``|`` is a stage boundary), then one multi-token-prediction block of ``* -``
(each ``/`` starts one MTP depth). The symbols are names in the ``layer`` registry: ``*``
attention and ``-`` MLP (mcore-models), ``E`` MoE (mcore-moe), ``M`` Mamba-2 and ``G`` gated delta
net (mcore-ssm). This module only parses; what a symbol builds is the registry's business.

Imports no torch: config validation runs before any model is built.
"""

from __future__ import annotations

from dataclasses import dataclass

STAGE_SEPARATOR = "|"
MTP_SEPARATOR = "/"


@dataclass(frozen=True)
class HybridPattern:
    """A parsed layer pattern."""

    layers: str
    """The main stack's symbols, one per layer, separators removed."""
    stage_layer_counts: tuple[int, ...] | None
    """Layers per pipeline segment when the pattern has ``|`` (None: split evenly)."""
    mtp_layers: tuple[str, ...] = ()
    """One pattern per multi-token-prediction depth (the parts after each ``/``)."""

    @property
    def symbols(self) -> set[str]:
        """Every distinct layer symbol, main stack and MTP blocks together."""
        return set(self.layers).union(*self.mtp_layers)


class PatternError(ValueError):
    """A layer pattern that cannot be parsed."""


def parse_hybrid_pattern(pattern: str) -> HybridPattern:
    """Split ``pattern`` into the main layers, their pipeline segments and the MTP blocks."""
    main, *mtp = pattern.split(MTP_SEPARATOR)
    segments = main.split(STAGE_SEPARATOR)
    if any(not segment for segment in segments):
        raise PatternError(
            f"layer pattern {pattern!r} has an empty pipeline segment: every '|' must sit "
            "between layer symbols"
        )
    for depth, block in enumerate(mtp, start=1):
        if not block:
            raise PatternError(f"layer pattern {pattern!r}: MTP block {depth} after '/' is empty")
        if STAGE_SEPARATOR in block:
            raise PatternError(
                f"layer pattern {pattern!r}: '|' may only split the main layers, not MTP block "
                f"{depth}"
            )
    for char in pattern:
        if char.isspace():
            raise PatternError(f"layer pattern {pattern!r} holds whitespace; remove it")
    counts = tuple(len(s) for s in segments) if len(segments) > 1 else None
    return HybridPattern("".join(segments), counts, tuple(mtp))
