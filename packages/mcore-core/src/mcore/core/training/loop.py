"""The training loop of ``mcore train``, readable top to bottom.

Everything parallel comes from the ``mcore_training_runtime`` hook (mcore-parallel provides it),
and every component by name from the registries: model, data-parallel wrapper, optimizer,
tokenizer and dataset. This module imports no other mcore package.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from mcore.core.config import Config
from mcore.core.data import build_datasets
from mcore.core.errors import McoreError
from mcore.core.plugins import PluginManager, get_plugin_manager
from mcore.core.protocols import Checkpointer, ReadsMetrics, TrainingRuntime
from mcore.core.training.flops import gpt_flops_per_token, mfu, peak_flops
from mcore.core.training.metrics import NonFiniteLossError, check_finite
from mcore.core.training.profiling import StartupTimes, StepProfiler, ranges
from mcore.core.training.straggler import StragglerDetector
from mcore.core.training.timers import Timers
from mcore.core.training.trainer import Trainer, init_distributed, setup_trainer

__all__ = ["NonFiniteLossError", "TrainResult", "Trainer", "init_distributed", "train"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run produced: the loss of every step, and where the checkpoint went."""

    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    tokens_per_step: int = 0
    checkpoint: str | None = None


def _micro_batches(dataset: Any, step: int, *, gbs: int, mbs: int, dp_rank: int, dp_size: int):
    """This data-parallel rank's micro-batches of ``step``: consecutive slices of the global
    batch, the same on every TP/PP rank of the replica."""
    per_rank = gbs // dp_size
    start = (step - 1) * gbs + dp_rank * per_rank
    for m in range(per_rank // mbs):
        first = start + m * mbs
        items = [dataset[(first + i) % len(dataset)] for i in range(mbs)]
        yield {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _forward_step(device: torch.device, trainer: Trainer, *, training: bool):
    """The schedule's forward step; in training, the last stage's objective takes the
    plugins' loss terms (``mcore_loss_terms``)."""
    runtime = trainer.runtime

    def forward_step(data_iterator: Iterator, model: Any):
        batch = runtime.prepare_batch({k: v.to(device) for k, v in next(data_iterator).items()})
        output = model(
            batch["tokens"],
            position_ids=batch["position_ids"],
            labels=batch["labels"],
            loss_mask=batch["loss_mask"],
        )

        def loss_func(per_token: torch.Tensor):
            mask = batch["loss_mask"].float()
            loss = (per_token.float() * mask).sum() / mask.sum().clamp(min=1)
            if not training:
                return loss, {"loss": loss.detach()}
            return trainer.objective(model, batch, loss)

        return output, loss_func

    return forward_step


def train(config: Config, *, manager: PluginManager | None = None) -> TrainResult:
    """Train as ``config`` says; returns the per-step losses. Call on every rank."""
    startup = StartupTimes()  # start-up phases, reported with the first step
    manager = manager or get_plugin_manager()
    trainer = setup_trainer(config, manager, command="train")
    hook, runtime, tokenizer = manager.hook, trainer.runtime, trainer.tokenizer
    ps, model_config = runtime.parallel_state, trainer.model_config
    train_cfg = config.train
    checkpointer = trainer.checkpointer = _checkpointer(config, runtime, manager)
    # Weights about to be loaded are not drawn first (at scale that is minutes of RNG).
    resuming = checkpointer is not None and checkpointer.resume_path() is not None
    trainer.build(initialize=not resuming)
    startup.mark("build")
    chunks, optimizer, scheduler = trainer.chunks, trainer.optimizer, trainer.scheduler
    assert optimizer is not None and scheduler is not None  # built just above
    resumed = checkpointer.load(chunks, optimizer, scheduler) if checkpointer else None
    start = trainer.iteration = int(resumed["iteration"]) if resumed else 0
    mbs = train_cfg.micro_batch_size
    gbs = train_cfg.global_batch_size or mbs * ps.dp_size
    if gbs % (mbs * ps.dp_size):
        raise McoreError(
            f"train.global_batch_size ({gbs}) must be a multiple of micro_batch_size ({mbs}) "
            f"x data-parallel size ({ps.dp_size})"
        )
    num_micro = gbs // (mbs * ps.dp_size)
    seq = train_cfg.seq_length
    eval_interval, eval_iters = train_cfg.eval_interval, train_cfg.eval_iters
    evaluations = train_cfg.train_iters // eval_interval if eval_interval else 0
    samples = {
        "train": train_cfg.train_iters * gbs,
        "valid": evaluations * eval_iters * gbs,
        "test": 0,
    }
    train_set, valid_set, _ = build_datasets(config, tokenizer, num_samples=samples)
    if evaluations and (valid_set is None or len(valid_set) == 0):
        raise McoreError(
            f"train.eval_interval is {eval_interval}, but the validation split is empty: give "
            f"it a share in data.split (now {getattr(config.data, 'split', None)!r})"
        )
    device = next(chunks[0].parameters()).device
    train_step = _forward_step(device, trainer, training=True)
    run_batch = _batch_runner(runtime, chunks, gbs=gbs, mbs=mbs, num_micro=num_micro, seq=seq)
    log.info(
        "training steps %d-%d: %d micro-batch(es) of %d x %d tokens per step on %s",
        start + 1, train_cfg.train_iters, num_micro, mbs, seq, device,
    )  # fmt: skip

    # --- the loop ------------------------------------------------------------------------
    result = trainer.result = TrainResult()
    logger_cfg, straggler_cfg = config.logger, config.straggler
    timers = Timers(cuda_sync=device.type == "cuda")
    straggler = StragglerDetector(
        minmax_count=straggler_cfg.straggler_minmax_count,
        enabled=straggler_cfg.log_straggler,
    )
    flops_per_token = _flops_per_token(model_config, seq)
    peak = peak_flops(device) if device.type == "cuda" else None
    logger = trainer.open_logger(resumed=resumed is not None)
    if start >= train_cfg.train_iters and ps.rank == 0:
        print(
            f"resumed at step {start} of train.train_iters={train_cfg.train_iters}: nothing left "
            "to train (raise train.train_iters, or save to a new checkpoint.save directory)",
            flush=True,
        )
    save_interval, exit_interval = config.checkpoint.save_interval, train_cfg.exit_interval
    hook.mcore_on_train_start(trainer=trainer)
    profiler = StepProfiler.from_config(
        config, rank=ps.rank, world_size=ps.world_size, device=device
    )
    startup.mark("load_data")
    try:
        for step in range(start + 1, train_cfg.train_iters + 1):
            profiler.step(step)  # the "step N" range; the trace starts or stops between steps
            timers("step").start()
            optimizer.zero_grad()
            with timers("forward-backward"):
                metrics = run_batch(
                    train_set,
                    step,
                    train_step,
                    # fp16: scale the loss before backward so small gradients do not underflow
                    grad_scale_func=optimizer.scale_loss if train_cfg.fp16 else None,
                )
            with timers("optimizer"), ranges.range("optimizer"):
                runtime.finalize_grads(chunks)
                _skipped, grad_norm = optimizer.step()
                scheduler.step()
            loss = runtime.reduce_loss([float(m["loss"]) for m in metrics])
            check_finite(step, loss)
            trainer.iteration = step
            elapsed = timers("step").stop()
            timers.step_end()
            straggler.record(elapsed)
            step_metrics = {
                "loss": loss,
                "grad_norm": float(grad_norm),
                "lr": float(optimizer.param_groups[0]["lr"]),
                "tokens_per_s": gbs * seq / elapsed,
                **trainer.reduce_terms(metrics),
            }
            if step == start + 1:  # start-up phases' min/max over ranks (collective), printed
                startup.report(rank=ps.rank, world_size=ps.world_size)
            evaluated = bool(eval_interval) and step % eval_interval == 0
            if evaluated:
                step_metrics.update(
                    _evaluate(
                        runtime, chunks, run_batch, _forward_step(device, trainer, training=False),
                        valid_set, round_=step // eval_interval, iters=eval_iters,
                    )
                )  # fmt: skip
            if logger.should_log(step) and isinstance(runtime, ReadsMetrics):
                # e.g. MoE balancing losses and expert load: they wait on the device, summed
                # over the interval, and are read (one collective) only when logged.
                step_metrics.update(runtime.read_metrics(chunks))
            trainer.step_metrics(step, step_metrics)
            if peak:  # MFU per GPU: the step's model FLOPs over what the GPUs could do
                per_gpu = step_metrics["tokens_per_s"] / ps.world_size
                step_metrics["mfu"] = mfu(per_gpu, flops_per_token, peak)
            result.losses.append(loss)
            result.grad_norms.append(float(grad_norm))
            result.step_seconds.append(elapsed)
            result.tokens_per_step = gbs * seq
            if evaluated or logger.should_log(step):  # the run's first record carries them
                step_metrics.update(startup.take_fields())
            logger.log(step, step_metrics, force=evaluated)
            if logger.should_log(step):
                if logger_cfg.timing_log_level > 0 and ps.rank == 0 and timers.summary():
                    print(timers.format(reset=True), flush=True)
                report = straggler.report()  # collective: every rank calls it
                if report is not None and ps.rank == 0:
                    print(report.format(), flush=True)
            hook.mcore_on_step_end(trainer=trainer, step=step, metrics=step_metrics)
            stop = bool(exit_interval) and step % exit_interval == 0
            if checkpointer is not None:
                last = step == train_cfg.train_iters or stop
                if config.checkpoint.save and (
                    last or (save_interval and step % save_interval == 0)
                ):
                    loop_state = {"iteration": step, "consumed_samples": step * gbs}
                    path = checkpointer.save(step, chunks, optimizer, scheduler, loop_state)
                    _published(trainer, [path] if path else [])
                _published(trainer, checkpointer.poll())
            if stop:
                break
        if checkpointer is not None:
            _published(trainer, checkpointer.finalize())
    finally:
        profiler.close()
        logger.close()
        hook.mcore_on_train_end(trainer=trainer)
    return result


def _batch_runner(
    runtime: TrainingRuntime,
    chunks: list[Any],
    *,
    gbs: int,
    mbs: int,
    num_micro: int,
    seq: int,
) -> Any:
    """``run(dataset, index, forward_step, **schedule_kwargs)``: global batch ``index`` (from
    1) of ``dataset`` through the runtime's schedule (forward and backward, or
    ``forward_only``); returns the micro-batches' metrics."""
    ps = runtime.parallel_state

    def run(dataset: Any, index: int, forward_step: Any, **kwargs: Any) -> list[Any]:
        # One iterator per model chunk: with virtual pipeline stages each chunk reads every
        # micro-batch (the first for tokens, the last for labels).
        iterators = [
            _micro_batches(dataset, index, gbs=gbs, mbs=mbs, dp_rank=ps.dp_rank, dp_size=ps.dp_size)
            for _ in chunks
        ]
        return runtime.forward_backward(
            forward_step_func=forward_step,
            data_iterator=iterators if len(chunks) > 1 else iterators[0],
            model=chunks,
            num_microbatches=num_micro,
            seq_length=seq,
            micro_batch_size=mbs,
            **kwargs,
        )

    return run


def _evaluate(
    runtime: TrainingRuntime,
    chunks: list[Any],
    run_batch: Any,
    forward_step: Any,
    valid_set: Any,
    *,
    round_: int,
    iters: int,
) -> dict[str, float]:
    """``iters`` global batches of the validation split, forward only, the model in eval mode
    (no dropout, no statistics): their mean loss and its perplexity, known on every rank. Each
    evaluation reads the next batches of the split, as Megatron's does."""
    for chunk in chunks:
        chunk.eval()
    losses = []
    try:
        for i in range(iters):
            index = (round_ - 1) * iters + i + 1
            metrics = run_batch(valid_set, index, forward_step, forward_only=True)
            losses.append(runtime.reduce_loss([float(m["loss"]) for m in metrics]))
    finally:
        for chunk in chunks:
            chunk.train()
    loss = sum(losses) / len(losses)
    return {"valid_loss": loss, "valid_ppl": math.exp(min(loss, 20.0))}


def _checkpointer(
    config: Config, runtime: TrainingRuntime, manager: PluginManager
) -> Checkpointer | None:
    """The installed checkpoint I/O (mcore-ckpt's), or None when the run saves and loads none."""
    checkpointer: Checkpointer | None = manager.hook.mcore_checkpointer(
        config=config, runtime=runtime
    )
    wanted = [f for f in ("save", "load") if getattr(config.checkpoint, f)]
    if checkpointer is None and wanted:
        raise McoreError(
            f"checkpoint.{wanted[0]} is set, but no installed plugin reads or writes "
            "checkpoints: pip install mcore-ckpt (or leave checkpoint.save and checkpoint.load "
            "unset)"
        )
    return checkpointer


def _published(trainer: Trainer, paths: list[str]) -> None:
    for path in paths:
        trainer.result.checkpoint = path
        trainer.hook.mcore_on_checkpoint_saved(trainer=trainer, path=path)


def _flops_per_token(model_config: Any, seq: int) -> float:
    return gpt_flops_per_token(
        num_layers=model_config.num_layers,
        hidden_size=model_config.hidden_size,
        ffn_hidden_size=model_config.ffn_hidden_size or 4 * model_config.hidden_size,
        num_attention_heads=model_config.num_attention_heads,
        num_query_groups=model_config.num_query_groups or model_config.num_attention_heads,
        vocab_size=model_config.vocab_size,
        seq_length=seq,
        gated_mlp=model_config.activation == "swiglu",
    )
