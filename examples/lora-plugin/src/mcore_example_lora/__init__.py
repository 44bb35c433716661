"""An example mcore plugin: LoRA adapters on a frozen model, configured by ``[lora]``."""

from __future__ import annotations

from typing import Any

__all__ = ["LoRAAdapter", "LoRAConfig", "add_lora"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so that loading the plugin (which imports this package) stays
    # free of torch.
    if name in ("LoRAAdapter", "add_lora"):
        from mcore_example_lora import lora

        return getattr(lora, name)
    if name == "LoRAConfig":
        from mcore_example_lora.config import LoRAConfig

        return LoRAConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
