"""Environments: a stream of problems and a verifier (see :mod:`megatron_rl.envs.base`)."""

from megatron_rl.envs.arithmetic import ArithmeticEnv
from megatron_rl.envs.base import Environment, Feedback, Problem, read_jsonl
from megatron_rl.envs.math_answer import MathAnswerEnv, answers_match, extract_answer
from megatron_rl.envs.string_task import StringTaskEnv, per_position_reward

__all__ = [
    "ArithmeticEnv",
    "Environment",
    "Feedback",
    "MathAnswerEnv",
    "Problem",
    "StringTaskEnv",
    "answers_match",
    "extract_answer",
    "per_position_reward",
    "read_jsonl",
]
