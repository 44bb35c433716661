"""megatron_rl: GRPO post-training of mcore models with agents and environments.

Names resolve on first use, so loading the plugin (``mcore plugins``) imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mcore.core.lazy import lazy_exports
from megatron_rl.config import RLConfig

_EXPORTS = {
    "Agent": "megatron_rl.agents",
    "MultiTurnAgent": "megatron_rl.agents",
    "SingleTurnAgent": "megatron_rl.agents",
    "Trajectory": "megatron_rl.agents",
    "Environment": "megatron_rl.envs.base",
    "Feedback": "megatron_rl.envs.base",
    "Problem": "megatron_rl.envs.base",
    "CoordinatorHandle": "megatron_rl.handles",
    "EngineHandle": "megatron_rl.handles",
    "Generation": "megatron_rl.handles",
    "HFHandle": "megatron_rl.handles",
    "InferenceHandle": "megatron_rl.handles",
    "OpenAIHandle": "megatron_rl.handles",
    "RLResult": "megatron_rl.loop",
    "train_rl": "megatron_rl.loop",
    "refit_engine": "megatron_rl.refit",
    "gather_full_state_dict": "megatron_rl.refit",
}

__all__ = [
    "Agent",
    "CoordinatorHandle",
    "EngineHandle",
    "Environment",
    "Feedback",
    "Generation",
    "HFHandle",
    "InferenceHandle",
    "MultiTurnAgent",
    "OpenAIHandle",
    "Problem",
    "RLConfig",
    "RLResult",
    "SingleTurnAgent",
    "Trajectory",
    "gather_full_state_dict",
    "refit_engine",
    "train_rl",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from megatron_rl.agents import Agent, MultiTurnAgent, SingleTurnAgent, Trajectory
    from megatron_rl.envs.base import Environment, Feedback, Problem
    from megatron_rl.handles import (
        CoordinatorHandle,
        EngineHandle,
        Generation,
        HFHandle,
        InferenceHandle,
        OpenAIHandle,
    )
    from megatron_rl.loop import RLResult, train_rl
    from megatron_rl.refit import gather_full_state_dict, refit_engine
