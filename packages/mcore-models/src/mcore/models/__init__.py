"""mcore.models: transformer layers assembled from specs, GPT models and Hugging Face interop."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Names resolve on first use, so importing a plugin module of this package (which the plugin
# loader does for `mcore plugins`) does not import torch.
_EXPORTS = {
    "GPTModel": "mcore.models.gpt",
    "LayerSpec": "mcore.models.layer",
    "ModelContext": "mcore.models.context",
    "TransformerConfig": "mcore.models.config",
    "TransformerLayer": "mcore.models.layer",
    "gpt_layer_spec": "mcore.models.layer",
}

__all__ = [
    "GPTModel",
    "LayerSpec",
    "ModelContext",
    "TransformerConfig",
    "TransformerLayer",
    "gpt_layer_spec",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:
    from mcore.models.config import (
        TransformerConfig,
    )
    from mcore.models.context import (
        ModelContext,
    )
    from mcore.models.gpt import (
        GPTModel,
    )
    from mcore.models.layer import (
        LayerSpec,
        TransformerLayer,
        gpt_layer_spec,
    )
