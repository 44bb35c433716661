"""Agents: drive one episode of an environment against an inference handle.

An agent is registered in the ``rl_agent`` registry as ``build(config) -> Agent``; its one
method is a coroutine, so the rollouts of a whole step run concurrently and the engine batches
their generations::

    class MyAgent:
        async def run(self, problem, env, handle, **generation_args) -> Trajectory:
            ids = encode_text(handle.tokenizer, problem.prompt)
            gen = await handle.agenerate(ids, **generation_args)
            feedback = env.score(problem, gen.text)
            return Trajectory.single_turn(ids, gen, feedback)

A :class:`Trajectory` is the token sequence training sees: the prompt, then every turn's
generated tokens (trained on, with the log-probabilities they were sampled with) and the
environment's observations between turns (context only). Agents work on token ids, never on
re-tokenized text, so training scores exactly the tokens that were sampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from megatron_rl.envs.base import Environment, Feedback, Problem
from megatron_rl.handles import Generation, InferenceHandle, encode_text

if TYPE_CHECKING:
    from mcore.core import Config
    from mcore.core.registry import Registries


@dataclass
class Trajectory:
    """One episode as training sees it; ``token_ids``, ``generated`` and ``logprobs`` align."""

    token_ids: list[int]
    generated: list[bool]
    """Whether each token was sampled from the policy (and so is trained on)."""
    logprobs: list[float]
    """The rollout log-probability of each generated token (0 elsewhere)."""
    reward: float
    num_turns: int = 1
    finish_reason: str | None = None
    info: dict[str, float] = field(default_factory=dict)
    problem_id: int | str = 0

    @property
    def num_generated(self) -> int:
        return sum(self.generated)

    @classmethod
    def single_turn(
        cls, prompt_ids: Sequence[int], gen: Generation, feedback: Feedback, problem_id: Any = 0
    ) -> Trajectory:
        n = len(prompt_ids)
        return cls(
            token_ids=[*prompt_ids, *gen.token_ids],
            generated=[False] * n + [True] * len(gen.token_ids),
            logprobs=[0.0] * n + list(gen.logprobs),
            reward=float(feedback.reward),
            finish_reason=gen.finish_reason,
            info=dict(feedback.info),
            problem_id=problem_id,
        )


@runtime_checkable
class Agent(Protocol):
    """Runs one episode of ``problem`` (see the module docstring); the ``rl_agent`` registry
    refuses an agent class, or what a factory builds, that lacks :meth:`run`."""

    async def run(
        self,
        problem: Problem,
        env: Environment,
        handle: InferenceHandle,
        **generation_args: Any,
    ) -> Trajectory:
        """Play one episode against ``env``, generating through ``handle`` with
        ``generation_args`` (see :mod:`megatron_rl.handles`)."""
        ...


class AgentBuilder(Protocol):
    """An ``rl_agent`` registry entry: builds the agent from the run's config."""

    def __call__(self, config: Config) -> Agent: ...


def build_agent(registries: Registries, name: str, config: Config) -> Agent:
    """The agent the ``rl_agent`` registry's entry ``name`` builds for ``config`` (refused
    when it lacks :meth:`Agent.run`)."""
    return registries["rl_agent"].build(name, config)


class SingleTurnAgent:
    """Prompt, one completion, one score: the usual GRPO episode."""

    async def run(
        self, problem: Problem, env: Environment, handle: InferenceHandle, **generation_args: Any
    ) -> Trajectory:
        prompt_ids = encode_text(handle.tokenizer, problem.prompt)
        gen = await handle.agenerate(prompt_ids, **generation_args)
        feedback = env.score(problem, gen.text, 0)
        return Trajectory.single_turn(prompt_ids, gen, feedback, problem.id)


class MultiTurnAgent:
    """Generate, let the environment answer, generate again, up to ``max_turns`` turns.

    The episode ends when the environment says ``done`` or at ``max_turns`` (a turn cut off
    by its token limit is the environment's to judge). The reward is the last turn's;
    ``info`` is the last turn's too, plus ``turns``. Each turn after the first continues the
    whole conversation so far (the KV cache's prefix sharing makes that cheap).
    """

    def __init__(self, max_turns: int = 2) -> None:
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        self.max_turns = max_turns

    async def run(
        self, problem: Problem, env: Environment, handle: InferenceHandle, **generation_args: Any
    ) -> Trajectory:
        tokens = encode_text(handle.tokenizer, problem.prompt)
        generated = [False] * len(tokens)
        logprobs = [0.0] * len(tokens)
        seed = generation_args.pop("seed", None)
        feedback = Feedback(reward=0.0)
        gen = None
        turn = 0
        for turn in range(self.max_turns):
            args = dict(generation_args)
            if seed is not None:
                args["seed"] = seed + 7919 * turn  # each turn its own draw, still reproducible
            gen = await handle.agenerate(tokens, **args)
            tokens += gen.token_ids
            generated += [True] * len(gen.token_ids)
            logprobs += list(gen.logprobs)
            feedback = env.score(problem, gen.text, turn)
            last = turn == self.max_turns - 1
            if feedback.done or last:
                break
            observation = encode_text(handle.tokenizer, feedback.observation or "")
            tokens += observation
            generated += [False] * len(observation)
            logprobs += [0.0] * len(observation)
        return Trajectory(
            token_ids=tokens,
            generated=generated,
            logprobs=logprobs,
            reward=float(feedback.reward),
            num_turns=turn + 1,
            finish_reason=gen.finish_reason if gen is not None else None,
            info={**feedback.info, "turns": float(turn + 1)},
            problem_id=problem.id,
        )


def build_single_turn(config: Any) -> SingleTurnAgent:
    """Registry entry ``single_turn``."""
    return SingleTurnAgent()


def build_multi_turn(config: Any) -> MultiTurnAgent:
    """Registry entry ``multi_turn`` (``rl.max_turns``)."""
    return MultiTurnAgent(max_turns=config.rl.max_turns)


if TYPE_CHECKING:
    # The built-in entries conform: the type checker verifies this assignment.
    _AGENTS: list[AgentBuilder] = [build_single_turn, build_multi_turn]
