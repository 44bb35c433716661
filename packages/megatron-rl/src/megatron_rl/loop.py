"""The GRPO loop of ``mcore rl``, readable top to bottom.

Every rank runs it. Each rank trains its part of the policy in the training layout (whatever
``[parallel]`` says: DP, TP, PP, EP, FSDP) and holds its part of an inference engine, which
generates that engine's share of the step's groups: the engine is split as training splits
the policy over tensor and pipeline parallelism, one engine per data-parallel rank, whose TP
and PP ranks run it together (:func:`megatron_rl.inference.engine_layout` says where it holds
the whole model instead). A new run may first warm the policy up with
``rl.sft_iters`` supervised steps on the environment's demonstrations. A step:

1. **Rollout**: resume the engine, let the agents play this engine's groups (its share
   of ``rl.prompts_per_step`` problems, ``rl.group_size`` episodes each), suspend the engine
   (its KV cache is freed for training).
2. **Advantages**: every rank receives every group; rewards become advantages within each
   group; groups whose rewards do not vary are counted (and dropped with
   ``rl.filter_groups_with_same_reward``).
3. **Train**: the episodes are split into ``rl.num_minibatches`` mini-batches of whole
   groups, packed into rows per data-parallel rank, and trained on with the GRPO loss through
   the runtime's schedule, ``rl.grpo_iterations`` passes (the log-probs of the policy before
   the updates and of the frozen reference are computed first when needed).
4. **Refit**: the new weights go from the training layout into every engine, each rank
   copying its own shards or, for whole-model engines, gathering them (every
   ``rl.max_generation_lag + 1`` steps); then metrics, hooks and checkpoints as in
   ``mcore train``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mcore.core import Config, McoreError
from mcore.core.plugins import PluginManager, get_plugin_manager
from mcore.core.training.metrics import MetricsLogger, check_finite
from mcore.core.training.trainer import Trainer, setup_trainer
from megatron_rl.agents import build_agent
from megatron_rl.envs.base import build_environment, demonstration
from megatron_rl.grpo import GRPOLossConfig, group_advantages, zero_variance_groups
from megatron_rl.handles import EngineHandle, encode_text
from megatron_rl.inference import build_engine, engine_layout, reference_chunks
from megatron_rl.packing import TrainSequence
from megatron_rl.refit import refit_engine
from megatron_rl.rollout import Group, RolloutRunner
from megatron_rl.trainer import GRPOTrainer, make_minibatch, with_loss_weights

CONSOLE_KEYS = (
    "loss",
    "grad_norm",
    "lr",
    "tokens_per_s",
    "rl/reward_mean",
    "rl/response_length",
    "rl/rollout_tokens_per_s",
)
"""The fields of a step's console line; ``metrics.jsonl`` and TensorBoard get all ~25."""


@dataclass
class RLResult:
    """What a run produced: one metrics dict per step, and where the checkpoint went."""

    metrics: list[dict[str, float]] = field(default_factory=list)
    checkpoint: str | None = None
    engine: Any = field(default=None, repr=False)
    """This rank's inference engine, refit with the final weights (for inspection)."""
    chunks: list = field(default_factory=list, repr=False)
    """This rank's trained model chunks."""
    trainer: Any = field(default=None, repr=False)
    """This rank's :class:`GRPOTrainer` (for scoring tokens with the trained policy)."""
    warm_up: list[float] = field(default_factory=list)
    """The supervised warm-up's loss at each of its steps (``rl.sft_iters``)."""

    @property
    def rewards(self) -> list[float]:
        """Mean reward of every step."""
        return [m["rl/reward_mean"] for m in self.metrics]


def train_rl(config: Config, *, manager: PluginManager | None = None) -> RLResult:
    """Run GRPO as ``config`` says (see the module docstring). Call on every rank."""
    manager = manager or get_plugin_manager()
    hook, registries = manager.hook, manager.registries
    if config.rl.use_checkpoint_args:
        config = _with_checkpoint_model(config)
    rl, train_cfg = config.rl, config.train
    run = setup_trainer(config, manager, command="rl")
    runtime, tokenizer, model_config = run.runtime, run.tokenizer, run.model_config
    ps = run.parallel_state
    if ps.cp_size > 1:
        raise McoreError(
            "parallel.cp > 1: packed RL rows are not split over context-parallel ranks yet; "
            "use tensor or pipeline parallelism for long sequences"
        )

    # --- the policy (training layout), its reference, the engine ---------------------------
    run.build()
    chunks, optimizer, scheduler = run.chunks, run.optimizer, run.scheduler
    assert optimizer is not None and scheduler is not None  # built just above
    checkpointer, resumed = _restore(config, runtime, manager, chunks, optimizer, scheduler)
    run.checkpointer = checkpointer
    start = run.iteration = int(resumed["iteration"]) if resumed else 0
    bin_size = rl.packing_bin_size or train_cfg.seq_length
    device = next(chunks[0].parameters()).device
    multiple_of = ps.tp_size if getattr(runtime, "sequence_parallel", False) else 1
    layout = engine_layout(runtime, rl.engine_layout)
    groups_here = _share(rl.prompts_per_step, layout.engines, layout.engine_rank)
    # Partial rollouts: twice this rank's groups in flight; a step takes the first to finish.
    in_flight = 2 * groups_here if rl.partial_rollouts else groups_here
    budget = rl.rollout_tokens_per_step if rl.partial_rollouts else None
    engine = build_engine(
        config,
        model_config,
        tokenizer,
        registries,
        device=device,
        max_requests=rl.inference_max_requests or max(1, in_flight * rl.group_size),
        max_sequence_length=bin_size,
        layout=layout,
    )

    # --- environment, agent, trainer; the warm-up; the reference; rollouts ---------------
    env = build_environment(registries, rl.env, config)
    agent = build_agent(registries, rl.agent, config)
    handle = EngineHandle(engine)
    trainer = GRPOTrainer(
        runtime,
        chunks,
        optimizer,
        loss_config=GRPOLossConfig.from_rl(rl),
        temperature=rl.temperature,
        vocab_size=tokenizer.vocab_size,
        packing=rl.use_sequence_packing,
        fp16=train_cfg.fp16,
    )
    updates_per_step = rl.grpo_iterations * rl.num_minibatches

    def minibatch(sequences: list[TrainSequence]) -> Any:
        """This rank's packed micro-batches of one optimizer step on ``sequences``."""
        return make_minibatch(
            sequences,
            dp_rank=ps.dp_rank,
            dp_size=ps.dp_size,
            rows_per_micro_batch=train_cfg.micro_batch_size,
            bin_size=bin_size,
            packing=rl.use_sequence_packing,
            multiple_of=multiple_of,
            device=device,
        )

    warm_up = []
    if rl.sft_iters and resumed is None:
        warm_up = _warm_up(config, env, handle.tokenizer, trainer, optimizer, minibatch)
    reference = None
    if rl.kl_beta > 0:  # the frozen initial (warmed-up) policy, same layout, forward only
        reference = reference_chunks(config, model_config, registries, runtime, chunks)
        if resumed and rl.finetune and config.checkpoint.load:
            _initial_weights(config, runtime, manager).load(reference, None, None)
    refit_engine(engine, chunks, sharded=layout.sharded)
    engine.suspend()

    consumed = int(resumed.get("consumed_samples", 0)) if resumed else 0
    runner = RolloutRunner(
        agent,
        env,
        handle,
        group_size=rl.group_size,
        generation_args=dict(
            max_tokens=rl.max_new_tokens,
            temperature=rl.temperature,
            top_p=rl.top_p,
            top_k=rl.top_k,
        ),
        rank=layout.engine_rank,
        world_size=layout.engines,
        seed=train_cfg.seed,
        start_group=math.ceil(consumed / layout.engines),
    )
    runner.policy_version = start

    result = run.result = RLResult(engine=engine, chunks=chunks, trainer=trainer, warm_up=warm_up)
    save_dir = config.checkpoint.save
    logger = run.open_logger(resumed=resumed is not None, console_keys=CONSOLE_KEYS)
    hook.mcore_on_train_start(trainer=run)
    try:
        for step in range(start + 1, train_cfg.train_iters + 1):
            # 1. rollout this engine's groups, then lend its memory to training
            engine.resume()
            began, tokens_before = time.perf_counter(), handle.generated_tokens
            mine = runner.collect(groups_here, in_flight=in_flight, token_budget=budget)
            engine.suspend()
            rollout = (handle.generated_tokens - tokens_before, time.perf_counter() - began)

            # 2. every rank gets every group; advantages are relative within each group
            groups, generated, rollout_seconds = _gather(
                mine, rollout, ps.world_size, reports=layout.reports
            )
            consumed = runner.next_group * layout.engines  # problems started, by all engines
            rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float64)
            advantages = group_advantages(
                rewards,
                normalize_by_std=rl.normalize_advantages_by_std,
                epsilon=rl.advantage_epsilon,
            )
            flat = zero_variance_groups(rewards)
            kept = [
                i for i in range(len(groups)) if not (rl.filter_groups_with_same_reward and flat[i])
            ]

            # 3. GRPO updates on packed mini-batches of whole groups
            began = time.perf_counter()
            batches = [
                minibatch(_sequences(groups, part, advantages, rl))
                for part in _split(kept, rl.num_minibatches)
            ]
            if updates_per_step > 1 or rl.max_generation_lag > 0 or rl.partial_rollouts:
                for batch in batches:  # pi_old: the policy before this step's updates
                    trainer.compute_logprobs(chunks, batch, "old_logprobs")
            if reference is not None:
                for batch in batches:
                    trainer.compute_logprobs(reference, batch, "ref_logprobs")
            sums, norms = {}, []
            for _ in range(rl.grpo_iterations):
                for batch in batches:
                    step_sums, grad_norm, _skipped = trainer.train_step(batch)
                    for k, v in step_sums.items():
                        sums[k] = sums.get(k, 0.0) + v
                    norms.append(grad_norm)
            if batches:
                scheduler.step()
            train_seconds = time.perf_counter() - began

            # 4. refit the engines with the new weights (or let them lag behind)
            refit_seconds = 0.0
            if step % (rl.max_generation_lag + 1) == 0 or step == train_cfg.train_iters:
                began = time.perf_counter()
                refit_engine(engine, chunks, sharded=layout.sharded)
                runner.policy_version = step
                refit_seconds = time.perf_counter() - began

            # 5. metrics, hooks, checkpoints
            trained_tokens = sum(b.tokens for b in batches) * rl.grpo_iterations
            row_tokens = sum(b.row_tokens for b in batches)
            metrics = _step_metrics(
                groups,
                rewards,
                flat,
                sums,
                norms,
                step=step,
                updates=len(norms),
                lr=float(optimizer.param_groups[0]["lr"]),
                has_kl=reference is not None,
            )
            metrics["rl/groups_trained"] = float(len(kept))
            if "loss" in metrics:
                check_finite(step, metrics["loss"])
            metrics.update({
                "tokens_per_s": trained_tokens / max(train_seconds, 1e-9),
                "rl/train_tokens_per_s": trained_tokens / max(train_seconds, 1e-9),
                "rl/rollout_tokens_per_s": generated / max(rollout_seconds, 1e-9),
                "rl/rollout_s": rollout_seconds,
                "rl/train_s": train_seconds,
                "rl/refit_s": refit_seconds,
                "rl/packing_efficiency": sum(b.tokens for b in batches) / max(row_tokens, 1),
            })  # fmt: skip
            run.iteration = step
            run.step_metrics(step, metrics)
            result.metrics.append(metrics)
            logger.log(step, metrics)
            hook.mcore_on_step_end(trainer=run, step=step, metrics=metrics)
            if checkpointer is not None and save_dir:
                interval = config.checkpoint.save_interval
                if step == train_cfg.train_iters or (interval and step % interval == 0):
                    state = {"iteration": step, "consumed_samples": consumed}
                    path = checkpointer.save(step, chunks, optimizer, scheduler, state)
                    _published(run, [path] if path else [])
                _published(run, checkpointer.poll())
        if checkpointer is not None:
            _published(run, checkpointer.finalize())
    finally:
        runner.close()
        logger.close()
        hook.mcore_on_train_end(trainer=run)
    return result


def _warm_up(
    config: Config,
    env: Any,
    tokenizer: Any,
    trainer: GRPOTrainer,
    optimizer: Any,
    minibatch: Any,
) -> list[float]:
    """``rl.sft_iters`` supervised steps on the environment's demonstrations (problem
    ``i`` of the warm-up is the environment's problem ``i``, prompt then answer then the end
    token, trained on the answer and the end token), at ``rl.sft_lr``; the LR schedule is
    left where it was. Returns the loss of each step; logged as ``rl/sft_loss``."""
    rl, ps = config.rl, trainer.ps
    per_step = rl.sft_batch_size or rl.prompts_per_step * rl.group_size
    end = sorted(getattr(tokenizer, "eos_token_ids", ()) or ())[:1]  # one end token
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = rl.sft_lr or config.optimizer.lr
    logger = MetricsLogger(
        metrics_file=None,  # the run's JSONL holds the GRPO steps
        tensorboard_dir=None,
        log_interval=config.logger.log_interval,
        total_steps=rl.sft_iters,
        progress_bar=False,
        rank=ps.rank,
    )
    losses = []
    try:
        for step in range(rl.sft_iters):
            sequences = []
            for index in range(step * per_step, (step + 1) * per_step):
                problem = env.problem(index)
                prompt = encode_text(tokenizer, problem.prompt)
                answer = encode_text(tokenizer, demonstration(env, problem)) + end
                mask = [False] * len(prompt) + [True] * len(answer)
                sequences.append(TrainSequence(prompt + answer, mask, [0.0] * len(mask), 0.0, []))
            sequences = with_loss_weights(
                sequences, "token_mean", max_completion_tokens=rl.max_new_tokens
            )
            loss, grad_norm = trainer.sft_step(minibatch(sequences))
            check_finite(step + 1, loss)
            losses.append(loss)
            logger.log(step + 1, {"rl/sft_loss": loss, "grad_norm": grad_norm})
    finally:
        logger.close()
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
    return losses


def _restore(
    config: Config, runtime: Any, manager: PluginManager, chunks: list, optimizer, scheduler
) -> tuple[Any, dict[str, int] | None]:
    """The run's checkpointer, and the loop state it resumed (None for a new run).

    A run resumes from ``checkpoint.save`` when that holds a checkpoint. Otherwise, with
    ``rl.finetune``, ``checkpoint.load`` gives the initial weights only: the optimizer's
    state and the LR schedule start fresh, at step 0. Without it, ``checkpoint.load`` resumes
    as in ``mcore train``.
    """
    save, load = config.checkpoint.save, config.checkpoint.load
    if not config.rl.finetune or not load:
        checkpointer = manager.hook.mcore_checkpointer(config=config, runtime=runtime)
        resumed = checkpointer.load(chunks, optimizer, scheduler) if checkpointer else None
        return checkpointer, resumed
    own = _with_checkpoint(config, load=None)  # resume our own saves, never checkpoint.load
    checkpointer = manager.hook.mcore_checkpointer(config=own, runtime=runtime)
    if checkpointer is None:
        raise McoreError("checkpoint.load is set, but no installed plugin reads checkpoints: "
                         "pip install mcore-ckpt")  # fmt: skip
    if save and (Path(save) / "latest").is_file():
        return checkpointer, checkpointer.load(chunks, optimizer, scheduler)
    fresh = optimizer.state_dict()
    _initial_weights(config, runtime, manager).load(chunks, optimizer, None)
    loaded = optimizer.state_dict()  # keep the loaded (fp32 main) weights, drop the moments
    optimizer.load_state_dict({**loaded, "optimizers": fresh["optimizers"]})
    return checkpointer, None


def _initial_weights(config: Config, runtime: Any, manager: PluginManager) -> Any:
    """A checkpointer that reads ``checkpoint.load`` and saves nothing."""
    reader = _with_checkpoint(config, save=None, async_save=False)
    return manager.hook.mcore_checkpointer(config=reader, runtime=runtime)


def _with_checkpoint_model(config: Config) -> Config:
    """``config`` with its ``[model]`` section as the checkpoint ``checkpoint.load`` saved."""
    if not config.checkpoint.load:
        raise McoreError("rl.use_checkpoint_args needs checkpoint.load: the checkpoint to "
                         "take the model config from")  # fmt: skip
    try:
        from mcore.ckpt import read_common, resolve
    except ImportError:
        raise McoreError(
            "rl.use_checkpoint_args reads checkpoints: pip install mcore-ckpt"
        ) from None
    path = resolve(config.checkpoint.load)
    saved = read_common(path).get("model")
    if not saved:
        raise McoreError(f"rl.use_checkpoint_args: {str(path)!r} records no model config")
    try:
        model = type(config.model)(**saved)
    except TypeError as exc:
        raise McoreError(
            f"rl.use_checkpoint_args: the model config of {str(path)!r} does not fit this "
            f"install's [model] section ({exc})"
        ) from None
    return _with_section(config, "model", model)


def _with_checkpoint(config: Config, **changes: Any) -> Config:
    return _with_section(config, "checkpoint", dataclasses.replace(config.checkpoint, **changes))


def _with_section(config: Config, name: str, section: Any) -> Config:
    """``config`` with section ``name`` replaced by ``section``."""
    sections = {n: getattr(config, n) for n in config.section_names()}
    sections[name] = section
    return Config(sections)


def _sequences(
    groups: list[Group], part: list[int], advantages: torch.Tensor, rl: Any
) -> list[TrainSequence]:
    """The episodes of groups ``part`` as training sequences, weighted for their mini-batch."""
    sequences = [
        TrainSequence(t.token_ids, t.generated, t.logprobs, float(advantages[g, j]), [])
        for g in part
        for j, t in enumerate(groups[g].trajectories)
    ]
    return with_loss_weights(
        sequences, rl.loss_aggregation, max_completion_tokens=rl.max_new_tokens
    )


def _share(total: int, world: int, rank: int) -> int:
    """Rank ``rank``'s share of ``total`` items over ``world`` ranks (the first get one more)."""
    return total // world + (rank < total % world)


def _split(items: list[int], parts: int) -> list[list[int]]:
    """``items`` in ``parts`` consecutive runs as equal as can be (empty runs left out)."""
    out, start = [], 0
    for p in range(parts):
        n = _share(len(items), parts, p)
        if n:
            out.append(items[start : start + n])
        start += n
    return out


def _gather(
    mine: list[Group], rollout: tuple[int, float], world: int, *, reports: bool = True
) -> tuple[list[Group], int, float]:
    """Every engine's groups (in problem order), generated tokens (sum) and rollout time
    (max). A rank that does not ``report`` (another rank of its engine does) adds its time
    only: its groups and tokens are that rank's too."""
    if not reports:
        mine, rollout = [], (0, rollout[1])
    parts: list[Any] = [(mine, rollout)]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, (mine, rollout))
    groups = sorted((g for part, _ in parts for g in part), key=lambda g: g.index)
    return groups, sum(r[0] for _, r in parts), max(r[1] for _, r in parts)


def _step_metrics(
    groups: list[Group],
    rewards: torch.Tensor,
    flat: torch.Tensor,
    sums: dict[str, float],
    norms: list[float],
    *,
    step: int,
    updates: int,
    lr: float,
    has_kl: bool,
) -> dict[str, float]:
    """The step's record: GRPO statistics as per-token means over the trained tokens."""
    trajectories = [t for g in groups for t in g.trajectories]
    metrics: dict[str, float] = {}
    tokens = sums.get("tokens", 0.0)
    if updates:
        metrics["loss"] = sums["loss"] / updates
        metrics["grad_norm"] = sum(norms) / len(norms)
    metrics["lr"] = lr
    metrics["rl/reward_mean"] = float(rewards.mean())
    metrics["rl/reward_std"] = float(rewards.flatten().std()) if rewards.numel() > 1 else 0.0
    if tokens:
        metrics["rl/entropy"] = sums["entropy"] / tokens
        metrics["rl/clip_fraction"] = sums["clipped"] / tokens
        metrics["rl/ratio_mean"] = sums["ratio"] / tokens
        metrics["rl/importance_weight"] = sums["is_weight"] / tokens
        metrics["rl/importance_truncated"] = sums["truncated"] / tokens
        if has_kl:
            metrics["rl/kl"] = sums["kl"] / tokens
    metrics["rl/groups"] = float(len(groups))
    metrics["rl/zero_variance_groups"] = float(flat.sum())
    metrics["rl/response_length"] = sum(t.num_generated for t in trajectories) / max(
        len(trajectories), 1
    )
    metrics["rl/generation_lag"] = sum(step - 1 - g.policy_version for g in groups) / max(
        len(groups), 1
    )
    info_keys = sorted({k for t in trajectories for k in t.info})
    for key in info_keys:
        values = [t.info[key] for t in trajectories if key in t.info]
        metrics[f"rl/env/{key}"] = sum(values) / len(values)
    return metrics


def _published(run: Trainer, paths: list[str]) -> None:
    for path in paths:
        run.result.checkpoint = path
        run.hook.mcore_on_checkpoint_saved(trainer=run, path=path)
