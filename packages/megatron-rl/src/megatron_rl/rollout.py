"""Rollouts: groups of episodes of one problem, run concurrently on a persistent event loop.

Each rank keeps a :class:`RolloutRunner`. ``collect(count)`` starts groups (problem numbers
``k * world_size + rank``, so engines never repeat each other's problems and a resumed run draws
the same ones) and runs the event loop until ``count`` of them are done. ``rank`` and
``world_size`` count engines, not processes: the ranks of an engine split over tensor-parallel
ranks and pipeline stages pass the same, and since nothing here depends on time or on the
process, they add the same requests in the same order and their engines step in lockstep. For
partial rollouts it keeps more in flight than it returns (``in_flight``) and may stop early on a
``token_budget``: the groups not returned stay in flight, their coroutines parked on the loop
and their requests inside the engine, and continue on the next ``collect``, possibly under
newer weights (each token keeps the log-probability it was sampled with).
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import Any

from megatron_rl.agents import Agent, Trajectory
from megatron_rl.envs.base import Environment, Problem
from megatron_rl.handles import InferenceHandle


@dataclass
class Group:
    """The ``group_size`` episodes of one problem; advantages are relative within it."""

    index: int
    """The problem's number in the environment's stream."""
    problem: Problem
    trajectories: list[Trajectory]
    policy_version: int
    """The weights version (training step of the last refit) the group started under."""

    @property
    def rewards(self) -> list[float]:
        return [t.reward for t in self.trajectories]


def sample_seed(base: int, group: int, sample: int) -> int:
    """The sampling seed of episode ``sample`` of group ``group``: layout-independent."""
    digest = hashlib.sha256(f"{base}/{group}/{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1


class RolloutRunner:
    """Runs one engine's share of the rollouts (see the module docstring)."""

    def __init__(
        self,
        agent: Agent,
        env: Environment,
        handle: InferenceHandle,
        *,
        group_size: int,
        generation_args: dict[str, Any],
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_group: int = 0,
    ) -> None:
        self.agent, self.env, self.handle = agent, env, handle
        self.group_size = group_size
        self.generation_args = dict(generation_args)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.policy_version = 0
        self._next = start_group  # this rank's next problem, counted in its own share
        self._loop = asyncio.new_event_loop()
        self._in_flight: dict[int, asyncio.Task] = {}

    @property
    def next_group(self) -> int:
        """How many groups this rank has started (what a resumed run continues from)."""
        return self._next

    def _start(self) -> None:
        index = self._next * self.world_size + self.rank
        self._next += 1
        problem = self.env.problem(index)
        self._in_flight[index] = self._loop.create_task(
            self._group(index, problem, self.policy_version)
        )

    async def _group(self, index: int, problem: Problem, version: int) -> Group:
        episodes = [
            self.agent.run(
                problem,
                self.env,
                self.handle,
                **self.generation_args,
                seed=sample_seed(self.seed, index, i),
            )
            for i in range(self.group_size)
        ]
        return Group(index, problem, list(await asyncio.gather(*episodes)), version)

    def collect(
        self, count: int, *, in_flight: int | None = None, token_budget: int | None = None
    ) -> list[Group]:
        """Up to ``count`` finished groups, in problem order.

        Groups in flight are topped up to ``in_flight`` (default ``count``) and the loop runs
        until ``count`` are done, or, with a ``token_budget``, until that many tokens were
        generated and at least one is done. Groups not returned stay in flight (finished or
        not) for the next call.
        """
        while len(self._in_flight) < max(count, in_flight or count):
            self._start()
        self._loop.run_until_complete(self._wait(count, token_budget))
        done = sorted(i for i, task in self._in_flight.items() if task.done())[:count]
        return [self._in_flight.pop(i).result() for i in done]

    async def _wait(self, count: int, token_budget: int | None) -> None:
        tasks = list(self._in_flight.values())
        counter = getattr(self.handle, "generated_tokens", None)
        start = counter or 0
        while True:
            done = [t for t in tasks if t.done()]
            for task in done:  # an agent's error surfaces now
                error = task.exception()
                if error is not None:
                    raise error
            if len(done) >= min(count, len(tasks)):
                return
            spent = (
                (getattr(self.handle, "generated_tokens", 0) - start) if counter is not None else 0
            )
            if token_budget is not None and done and spent >= token_budget:
                return
            if counter is None:  # a remote server: wait for the next group to finish
                pending = [t for t in tasks if not t.done()]
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            else:  # the engine handle's driver runs one engine step per turn of the loop
                await asyncio.sleep(0)

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    def close(self) -> None:
        """Cancel the episodes still in flight and close the event loop."""
        for task in self._in_flight.values():
            task.cancel()
        pending = [t for t in asyncio.all_tasks(self._loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._in_flight.clear()
        self._loop.close()
