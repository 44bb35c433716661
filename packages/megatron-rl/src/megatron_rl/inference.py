"""The model copies the RL loop needs besides the policy: the engine's and the reference's.

- :func:`build_engine`: a ``DynamicInferenceEngine`` over a whole single-process model built
  from the same model config as training (the inference layout: no TP/PP), on this rank's
  device, sized for this rank's rollouts. Its weights arrive by refit.
- :func:`reference_chunks`: a frozen copy of the policy's chunks in the training layout, for
  the KL penalty (forward only, never stepped).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from mcore.parallel import ParallelState
from mcore.parallel.sharding import model_sharded_tensors, unwrap
from megatron_rl.refit import gather_full_state_dict


def single_process_state() -> ParallelState:
    """A ``ParallelState`` of one process, also inside a distributed job (the engine's model
    communicates with no one)."""
    # ParallelState() joins the world when torch.distributed is initialized; the engine's
    # model must not. mcore-parallel has no public constructor for this yet.
    state = object.__new__(ParallelState)
    state._init_single_process()
    return state


def build_engine(
    config: Any,
    model_config: Any,
    tokenizer: Any,
    registries: Any,
    *,
    device: torch.device,
    max_requests: int,
    max_sequence_length: int,
) -> Any:
    """An inference engine for this rank (see the module docstring).

    From the ``[inference]`` section: ``max_sequence_length`` is capped by the longest
    trajectory a packing bin holds, KV blocks by that length, ``max_requests`` is this rank's
    rollouts per step (``rl.inference_max_requests`` overrides), the device is training's.
    """
    from mcore.inference import DynamicInferenceEngine, InferenceConfig
    from mcore.inference.tokenizer import CoreTextTokenizer

    build = registries.get("model", model_config.name)
    model = build(model_config, single_process_state(), sections=config, registries=registries)
    base = config.inference if "inference" in config else InferenceConfig()
    longest = min(base.max_sequence_length, max_sequence_length)
    block = min(base.block_size_tokens, 1 << max(4, (longest - 1).bit_length()))
    engine_config = dataclasses.replace(
        base,
        max_requests=max_requests,
        max_tokens=None if base.max_tokens is None else max(base.max_tokens, max_requests),
        max_sequence_length=longest,
        block_size_tokens=block,
        device=str(device),
        seed=config.train.seed,
    )
    return DynamicInferenceEngine(
        model,
        engine_config,
        tokenizer=CoreTextTokenizer(tokenizer),
        vocab_size=tokenizer.vocab_size,
    )


def reference_chunks(
    config: Any, model_config: Any, registries: Any, runtime: Any, chunks: list
) -> list[torch.nn.Module]:
    """Frozen copies of the policy's model chunks in the training layout (TP/PP/EP shards as
    the policy's; never fully sharded), in the policy's dtype. A collective: the policy's
    full weights are assembled once and each copy takes its pieces of them."""
    build = registries.get("model", model_config.name)
    vp_size = getattr(runtime, "vp_size", None)
    out = []
    for c, chunk in enumerate(chunks):
        kwargs = dict(vp_stage=c, vp_size=vp_size) if vp_size else {}
        ref = build(
            model_config,
            runtime.parallel_state,
            sequence_parallel=getattr(runtime, "sequence_parallel", False),
            sections=config,
            registries=registries,
            **kwargs,
        )
        param = next(unwrap(chunk).parameters())
        out.append(ref.to(param.device, param.dtype).requires_grad_(False).eval())
    full = gather_full_state_dict(chunks)
    with torch.no_grad():
        for key, sharded in model_sharded_tensors(out).items():
            for view, offset in sharded.pieces:
                piece = full[key]
                for dim, (start, length) in enumerate(zip(offset, view.shape, strict=True)):
                    piece = piece.narrow(dim, start, length)
                view.copy_(piece)
    return out
