"""``arithmetic``: ``a+b=`` / ``a-b=`` / ``a*b=`` with an exact integer verifier.

Reward 1 when the completion's first line is exactly the integer answer (``"19"`` for
``"12+7="``), else 0. A wrong answer is not the end with a multi-turn agent: the environment
answers ``"\\nno. again: 12+7="`` and a later correct answer earns ``0.5 ** turn``. Problems
are drawn from ``random.Random(seed, index)``, so problem ``i`` is the same on every rank.
"""

from __future__ import annotations

import random
import re
from typing import Any

from megatron_rl.envs.base import Feedback, Problem

_INTEGER = re.compile(r"-?\d+")


class ArithmeticEnv:
    """Integer arithmetic over operands ``0..max_operand`` with the operators ``ops``."""

    name = "arithmetic"

    def __init__(self, *, max_operand: int = 20, ops: str = "+-", seed: int = 0) -> None:
        if max_operand < 1:
            raise ValueError(f"max_operand must be >= 1, got {max_operand}")
        bad = sorted(set(ops) - set("+-*"))
        if not ops or bad:
            raise ValueError(f"ops must be a non-empty string of + - *, got {ops!r}")
        self.max_operand, self.ops, self.seed = max_operand, ops, seed

    def problem(self, index: int) -> Problem:
        rng = random.Random(f"{self.seed}/arithmetic/{index}")
        a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
        op = rng.choice(self.ops)
        answer = a + b if op == "+" else a - b if op == "-" else a * b
        return Problem(prompt=f"{a}{op}{b}=", answer=answer, id=index)

    def demonstration(self, problem: Problem) -> str:
        """The integer answer, ended by a newline (for ``rl.sft_iters``)."""
        return f"{problem.answer}\n"

    def score(self, problem: Problem, completion: str, turn: int = 0) -> Feedback:
        first = completion.strip().split("\n", 1)[0].strip()
        correct = bool(_INTEGER.fullmatch(first)) and int(first) == problem.answer
        if correct:
            return Feedback(reward=0.5**turn, info={"accuracy": 1.0})
        return Feedback(
            reward=0.0,
            done=False,
            observation=f"\nno. again: {problem.prompt}",
            info={"accuracy": 0.0},
        )


def build_arithmetic(config: Any) -> ArithmeticEnv:
    """Registry entry ``arithmetic`` (``rl.env_max_operand``; seeded by ``train.seed``)."""
    return ArithmeticEnv(max_operand=config.rl.env_max_operand, seed=config.train.seed)
