"""``mcore rl [FILE] [--nproc N] [--section.field VALUE ...]``: GRPO post-training.

Launches like ``mcore train`` (:func:`mcore.core.training.cli.training_command`): under
torchrun every rank runs the loop; otherwise ``--nproc N`` (default: one rank per GPU, or 2 CPU
ranks with gloo) starts the local ranks. The config is checked, and the environment and agent
looked up, before any rank starts.
"""

from __future__ import annotations

from mcore.core import Config
from mcore.core.training.cli import is_rank_zero, training_command

DEFAULT_SAVE = "mcore-rl-run"


def _rl(config: Config) -> int:
    from megatron_rl.loop import train_rl

    result = train_rl(config)
    if is_rank_zero():
        if result.metrics:
            first, last = result.rewards[0], result.rewards[-1]
            print(f"mean reward: step 1 {first:.3f} -> step {len(result.rewards)} {last:.3f}")
        if result.checkpoint:
            print(f"checkpoint: {result.checkpoint}")
    return 0


RL = training_command(
    "rl",
    help="GRPO post-training: rollouts on the inference engine, packed updates, weight refit",
    default_save=DEFAULT_SAVE,
    run=_rl,
)
