"""The model copies the RL loop needs besides the policy: the engine's and the reference's.

- :func:`engine_layout`: where the engines live. In the training layout where the engine runs
  it (``sharded``: tensor and pipeline parallelism, experts inside the TP group; one engine per
  model replica, i.e. per data-parallel rank, whose TP and PP ranks add the same requests and
  step together), else a whole single-process model on every rank (``whole``: virtual pipeline
  stages, experts spread over data-parallel ranks, or ``rl.engine_layout = "whole"``).
- :func:`build_engine`: a ``DynamicInferenceEngine`` over that model, built on ``meta`` and
  given storage for only this rank's shards (its weights arrive by refit), on this rank's
  device, sized for this engine's rollouts.
- :func:`reference_chunks`: a frozen copy of the policy's chunks in the training layout, for
  the KL penalty (forward only, never stepped), filled from each rank's own shards.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mcore.parallel import ParallelState
from mcore.parallel.init import materialize
from mcore.parallel.sharding import unwrap
from megatron_rl.refit import copy_local_weights

if TYPE_CHECKING:
    from mcore.inference import DynamicInferenceEngine

log = logging.getLogger(__name__)


def single_process_state() -> ParallelState:
    """A ``ParallelState`` of one process, also inside a distributed job (the engine's model
    communicates with no one)."""
    # ParallelState() joins the world when torch.distributed is initialized; the engine's
    # model must not. mcore-parallel has no public constructor for this yet.
    state = object.__new__(ParallelState)
    state._init_single_process()
    return state


@dataclass(frozen=True)
class EngineLayout:
    """Where this rank's engine lives, and which ranks share it."""

    sharded: bool
    """The engine's model is this rank's shards of the training layout (refit copies local
    tensors); otherwise it is the whole single-process model (refit gathers every tensor)."""
    parallel_state: ParallelState
    """The layout the engine's model is built in."""
    engines: int
    """Independent engines over the world: each plays its own share of the rollouts."""
    engine_rank: int
    """This rank's engine among them (the ranks of one engine add the same requests)."""
    reports: bool
    """Whether this rank reports its engine's rollouts (one rank per engine does)."""
    reason: str = ""
    """Why the engine holds the whole model, when it does."""


def engine_layout(runtime: Any, choice: str = "training") -> EngineLayout:
    """The engines' layout for ``runtime``'s training layout (``rl.engine_layout``).

    ``training`` shards the engine as training shards the policy wherever the engine runs that
    layout: tensor and pipeline parallelism (each stage's engine holds that stage's layers
    under their training names), with experts split only inside the TP group. One engine
    serves each data-parallel rank: all its TP and PP ranks add the same requests in the same
    order and step together, and its first rank reports the rollouts. Virtual pipeline stages
    (a stage holding several chunks, where the engine holds one run of layers) and experts
    split over data-parallel ranks (whose rollouts would have to run in lockstep) keep the
    whole model per rank, and the log says so.
    """
    ps = runtime.parallel_state
    vp_size = getattr(runtime, "vp_size", None) or 1
    reason = ""
    if choice == "whole":
        reason = "rl.engine_layout = 'whole'"
    elif vp_size > 1:
        reason = (
            "virtual pipeline stages (parallel.virtual_pipeline_model_parallel_size = "
            f"{vp_size}) interleave each stage's layers over chunks, while a pipeline stage's "
            "engine holds one run of layers: each rank's engine holds the whole model and "
            "refit gathers it"
        )
    elif ps.tp_size % (ps.ep_size * ps.etp_size):
        reason = (
            f"experts are split over ranks outside the tensor-parallel group (ep {ps.ep_size} x "
            f"etp {ps.etp_size} does not divide tp {ps.tp_size}): engines over expert shards of "
            "data-parallel ranks are pending; each rank's engine holds the whole model and "
            "refit gathers it"
        )
    if reason:
        if choice != "whole" and ps.rank == 0:
            log.warning("mcore rl: %s", reason)
        return EngineLayout(False, single_process_state(), ps.world_size, ps.rank, True, reason)
    split = ps.tp_size > 1 or ps.pp_size > 1
    state = ps if split else single_process_state()
    reports = ps.tp_rank == 0 and ps.pp_rank == 0
    return EngineLayout(True, state, ps.dp_size, ps.dp_rank, reports)


def build_engine(
    config: Any,
    model_config: Any,
    tokenizer: Any,
    registries: Any,
    *,
    device: torch.device,
    max_requests: int,
    max_sequence_length: int,
    layout: EngineLayout | None = None,
) -> DynamicInferenceEngine:
    """An inference engine for this rank (see the module docstring); ``layout`` defaults to
    the whole single-process model.

    From the ``[inference]`` section: ``max_sequence_length`` is capped by the longest
    trajectory a packing bin holds, KV blocks by that length, ``max_requests`` is this
    engine's rollouts per step (``rl.inference_max_requests`` overrides), the device is
    training's. The model's weights are left unset: a refit must follow.
    """
    from mcore.inference import DynamicInferenceEngine, InferenceConfig
    from mcore.inference.tokenizer import CoreTextTokenizer

    state = layout.parallel_state if layout is not None else single_process_state()
    build = registries.get("model", model_config.name)
    # On meta, then storage for this rank's shards only; no initial weights are drawn.
    with torch.device("meta"):
        model = build(
            model_config, state, sequence_parallel=False, sections=config, registries=registries
        )
    materialize(model, device=device, seed=0, initialize=False)
    model = model.to(device)  # derived buffers (rotary frequencies) are built on the CPU
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
    the policy's; never fully sharded), in the policy's dtype, each rank copying its own
    shards (fully sharded parameters are gathered over data-parallel ranks only)."""
    build = registries.get("model", model_config.name)
    vp_size = getattr(runtime, "vp_size", None)
    out = []
    for c, chunk in enumerate(chunks):
        kwargs = dict(vp_stage=c, vp_size=vp_size) if vp_size else {}
        with torch.device("meta"):
            ref = build(
                model_config,
                runtime.parallel_state,
                sequence_parallel=getattr(runtime, "sequence_parallel", False),
                sections=config,
                registries=registries,
                **kwargs,
            )
        param = next(unwrap(chunk).parameters())
        materialize(ref, device=param.device, seed=0, initialize=False)
        ref = ref.to(param.device, param.dtype).requires_grad_(False).eval()
        copy_local_weights(ref, chunk)
        out.append(ref)
    return out
