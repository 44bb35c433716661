"""mcore.models: transformer layers assembled from specs, GPT models and Hugging Face interop."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mcore.core.lazy import lazy_exports

# Names resolve on first use, so importing a plugin module of this package (which the plugin
# loader does for `mcore plugins`) does not import torch.
_EXPORTS = {
    "GPTModel": "mcore.models.gpt",
    "LayerSpec": "mcore.models.layer",
    "ModelContext": "mcore.models.context",
    "PackedSeqParams": "mcore.models.packing",
    "TransformerConfig": "mcore.models.config",
    "TransformerLayer": "mcore.models.layer",
    "gpt_layer_spec": "mcore.models.layer",
}

__all__ = [
    "GPTModel",
    "LayerSpec",
    "ModelContext",
    "PackedSeqParams",
    "TransformerConfig",
    "TransformerLayer",
    "gpt_layer_spec",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

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
    from mcore.models.packing import PackedSeqParams
