"""megatron_rl: GRPO post-training of mcore models with agents and environments."""

from megatron_rl.config import RLConfig

__all__ = ["RLConfig"]
