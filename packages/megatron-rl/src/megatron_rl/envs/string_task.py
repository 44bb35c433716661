"""``string_copy`` and ``string_reverse``: repeat (or reverse) a short string, with a dense
per-position reward.

The prompt is the string and ``=`` (``"abca="``); the answer is ``"abca"`` (or ``"acba"``).
The reward gives credit position by position: the number of positions where the completion
has the answer's character, divided by the longer of the two lengths, so a completion that is
right but too long, or right only in part, earns a fraction. A random policy already scores
about ``1 / alphabet`` per position: a signal a tiny model learns from quickly.
"""

from __future__ import annotations

import random
from typing import Any, Literal

from megatron_rl.envs.base import Feedback, Problem


def per_position_reward(completion: str, answer: str) -> float:
    """Matching positions over the longer length (1 exactly for ``completion == answer``)."""
    longest = max(len(completion), len(answer))
    if longest == 0:
        return 1.0
    return sum(a == b for a, b in zip(completion, answer, strict=False)) / longest


class StringTaskEnv:
    """Copy or reverse strings of ``min_length..max_length`` characters of ``alphabet``."""

    def __init__(
        self,
        mode: Literal["copy", "reverse"],
        *,
        alphabet: str = "abcd",
        min_length: int = 2,
        max_length: int = 4,
        seed: int = 0,
    ) -> None:
        if mode not in ("copy", "reverse"):
            raise ValueError(f"mode must be 'copy' or 'reverse', got {mode!r}")
        if not 1 <= min_length <= max_length:
            raise ValueError(f"need 1 <= min_length <= max_length, got {min_length}, {max_length}")
        if len(set(alphabet)) < 2:
            raise ValueError(f"alphabet needs at least 2 distinct characters, got {alphabet!r}")
        self.mode, self.alphabet = mode, alphabet
        self.min_length, self.max_length, self.seed = min_length, max_length, seed
        self.name = f"string_{mode}"

    def problem(self, index: int) -> Problem:
        rng = random.Random(f"{self.seed}/string/{index}")  # copy and reverse: same strings
        length = rng.randint(self.min_length, self.max_length)
        text = "".join(rng.choice(self.alphabet) for _ in range(length))
        answer = text if self.mode == "copy" else text[::-1]
        return Problem(prompt=f"{text}=", answer=answer, id=index)

    def demonstration(self, problem: Problem) -> str:
        """The answer itself (for ``rl.sft_iters``)."""
        return problem.answer

    def score(self, problem: Problem, completion: str, turn: int = 0) -> Feedback:
        reward = per_position_reward(completion, problem.answer)
        return Feedback(reward=reward, info={"exact_match": float(completion == problem.answer)})


def _build(mode: Literal["copy", "reverse"], config: Any) -> StringTaskEnv:
    rl = config.rl
    return StringTaskEnv(
        mode,
        alphabet=rl.env_alphabet,
        min_length=rl.env_min_length,
        max_length=rl.env_max_length,
        seed=config.train.seed,
    )


def build_string_copy(config: Any) -> StringTaskEnv:
    """Registry entry ``string_copy`` (``rl.env_alphabet``, ``rl.env_min_length``, ...)."""
    return _build("copy", config)


def build_string_reverse(config: Any) -> StringTaskEnv:
    """Registry entry ``string_reverse``."""
    return _build("reverse", config)
