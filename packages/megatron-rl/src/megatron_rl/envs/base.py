"""What an environment is: a deterministic stream of problems and a verifier of answers.

An environment is registered in the ``rl_env`` registry as ``build(config) -> Environment``
(``config`` is the run's :class:`~mcore.core.Config`). Problems are addressed by index so that
every rank, and a resumed run, draws the same ones without communicating::

    class MyEnv:
        name = "my_env"

        def problem(self, index: int) -> Problem:
            return Problem(prompt=f"{index}+1=", answer=index + 1, id=index)

        def score(self, problem: Problem, completion: str, turn: int = 0) -> Feedback:
            return Feedback(reward=float(completion.strip() == str(problem.answer)))

An environment that knows a correct answer text may also offer
``demonstration(problem) -> str``: ``rl.sft_iters`` warms a policy up on those answers with
cross-entropy before GRPO starts.

A multi-turn environment answers ``Feedback(done=False, observation="...")`` to continue the
episode: the observation is appended to the conversation and the agent generates again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from mcore.core import McoreError

if TYPE_CHECKING:
    from mcore.core import Config
    from mcore.core.registry import Registries


@dataclass(frozen=True)
class Problem:
    """One prompt and what a verifier needs to score answers to it."""

    prompt: str
    """The text the model continues."""
    answer: Any = None
    """The reference answer (the environment decides its type)."""
    id: int | str = 0
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Feedback:
    """An environment's verdict on one turn."""

    reward: float
    """Reward of the episode so far; the last turn's is the episode's."""
    done: bool = True
    """Whether the episode ends here (single-turn environments always say so)."""
    observation: str | None = None
    """Text to append before the agent's next turn (multi-turn only)."""
    info: dict[str, float] = field(default_factory=dict)
    """Numbers to log, averaged over the step's rollouts as ``rl/env/<key>``."""


@runtime_checkable
class Environment(Protocol):
    """Yields prompts and scores completions (see the module docstring); the ``rl_env``
    registry refuses an environment class, or what a factory builds, that lacks a member."""

    name: str
    """The environment's name, for messages and logs."""

    def problem(self, index: int) -> Problem:
        """Problem number ``index`` of an endless, deterministic stream."""
        ...

    def score(self, problem: Problem, completion: str, turn: int = 0) -> Feedback:
        """Score ``completion`` (the text of turn ``turn``, counted from 0)."""
        ...


class EnvironmentBuilder(Protocol):
    """An ``rl_env`` registry entry: builds the environment from the run's config."""

    def __call__(self, config: Config) -> Environment: ...


def build_environment(registries: Registries, name: str, config: Config) -> Environment:
    """The environment the ``rl_env`` registry's entry ``name`` builds for ``config``
    (refused when it lacks a member of :class:`Environment`)."""
    return registries["rl_env"].build(name, config)


def demonstration(env: Environment, problem: Problem) -> str:
    """A correct completion of ``problem`` from ``env``, for supervised warm-up; the error
    names the environment when it offers none."""
    show = getattr(env, "demonstration", None)
    if show is None:
        raise McoreError(
            f"rl.sft_iters > 0 needs demonstrations, and environment {env.name!r} offers "
            "none (it has no demonstration(problem) method); set rl.sft_iters = 0"
        )
    return show(problem)


def read_jsonl(path: str | Path, *, required: tuple[str, ...], source: str) -> list[dict]:
    """The objects of a JSONL file, each checked to hold ``required`` keys; errors name the
    line and ``source`` (the config field that pointed here)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise McoreError(f"{source}: cannot read {str(path)!r}: {exc.strerror}") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise McoreError(f"{source}: {path}:{number} is not JSON ({exc.msg})") from None
        missing = [k for k in required if not isinstance(record, dict) or k not in record]
        if missing:
            raise McoreError(
                f"{source}: {path}:{number} lacks {', '.join(map(repr, missing))}; each line "
                f"must be an object with {', '.join(map(repr, required))}"
            )
        records.append(record)
    if not records:
        raise McoreError(f"{source}: {str(path)!r} holds no problems")
    return records


if TYPE_CHECKING:
    # The built-in entries conform: the type checker verifies this assignment.
    from megatron_rl.envs.arithmetic import build_arithmetic
    from megatron_rl.envs.math_answer import build_math_answer
    from megatron_rl.envs.string_task import build_string_copy, build_string_reverse

    _ENVIRONMENTS: list[EnvironmentBuilder] = [
        build_arithmetic,
        build_math_answer,
        build_string_copy,
        build_string_reverse,
    ]
