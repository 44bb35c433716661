"""The run both ``mcore train`` and ``mcore rl`` are made of, and what every lifecycle hook
receives: config, parallel runtime, model chunks, optimizer, scheduler, tokenizer, checkpointer,
metrics logger and the iteration.

    trainer = setup_trainer(config, manager, command="train")  # runtime, tokenizer, vocab
    trainer.build(initialize=True)     # chunks, optimizer, scheduler; mcore_on_model_built
    trainer.open_logger(resumed=False)  # metrics.jsonl, TensorBoard, console

The loops own what differs (the data and schedule of pre-training, GRPO's rollouts); this
module owns what they share, so a plugin sees the same object under either command.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mcore.core.config import Config
from mcore.core.data import build_tokenizer
from mcore.core.data.tokenizer import Tokenizer
from mcore.core.errors import McoreError
from mcore.core.plugins import PluginManager
from mcore.core.protocols import Checkpointer, LRSchedule, TrainingOptimizer, TrainingRuntime
from mcore.core.registry import Registries
from mcore.core.training.metrics import MetricsLogger, configure_logging

__all__ = ["Trainer", "init_distributed", "padded_vocab", "setup_trainer"]

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Trainer:
    """One training run on this rank; built by :func:`setup_trainer`, handed to every hook.

    Plugins read it, and may set :attr:`lm_loss_weight` and keep their own per-run objects in
    :attr:`state` under their name. ``chunks`` are the model chunks the schedule runs (data
    parallel wrappers included; :func:`mcore.parallel.sharding.unwrap` reaches the model).
    """

    config: Config
    manager: PluginManager
    runtime: TrainingRuntime
    """The parallel runtime (the ``mcore_training_runtime`` hook's)."""
    tokenizer: Tokenizer
    model_config: Any
    """``config.model`` with the vocabulary padded for this layout."""
    command: str = "train"
    """``"train"`` or ``"rl"``: the command running the loop."""
    chunks: list[torch.nn.Module] = field(default_factory=list)
    optimizer: TrainingOptimizer | None = None
    """Set by :meth:`build` (``None`` only before it)."""
    scheduler: LRSchedule | None = None
    checkpointer: Checkpointer | None = None
    """The checkpoint I/O (mcore-ckpt's), or ``None`` when the run saves and loads none."""
    logger: MetricsLogger | None = None
    iteration: int = 0
    """The last finished optimizer step (the resumed one before the first step)."""
    lm_loss_weight: float = 1.0
    """The language-model loss's weight in the objective (``0``: train on added terms only,
    e.g. distillation without the data's labels)."""
    state: dict[str, Any] = field(default_factory=dict)
    """Plugins' own objects for this run, by plugin name."""
    result: Any = None
    """What the loop returns (``TrainResult`` or ``RLResult``), filled as it runs."""
    _term_names: list[str] | None = field(default=None, repr=False)

    @property
    def parallel_state(self) -> Any:
        """The layout: ranks and process groups of every parallel dimension (the runtime's,
        mcore-parallel's ``ParallelState`` under its runtime: typed loosely because the core
        cannot name it, and plugins hand it to mcore-parallel's functions)."""
        return self.runtime.parallel_state

    @property
    def hook(self) -> Any:
        return self.manager.hook

    @property
    def registries(self) -> Registries:
        return self.manager.registries

    def build(self, *, initialize: bool = True) -> None:
        """Build this rank's model chunks, optimizer and LR schedule through the runtime; the
        ``mcore_on_model_built`` hook sees the bare chunks before they are materialised and
        wrapped (``initialize=False``: a checkpoint is about to be loaded into them)."""

        def on_model(chunks: list[torch.nn.Module]) -> None:
            self.hook.mcore_on_model_built(trainer=self, chunks=chunks)

        self.chunks, self.optimizer, self.scheduler = self.runtime.build(
            self.config,
            self.model_config,
            self.registries,
            initialize=initialize,
            on_model=on_model,
        )

    def open_logger(
        self, *, resumed: bool, console_keys: tuple[str, ...] | None = None
    ) -> MetricsLogger:
        """The run's metrics logger (console, ``metrics.jsonl``, TensorBoard): the file is
        ``logger.metrics_file``, else ``metrics.jsonl`` in ``checkpoint.save``; a new run
        (not ``resumed``) starts it afresh."""
        config, ps = self.config, self.parallel_state
        save_dir = config.checkpoint.save
        metrics_file = config.logger.metrics_file or (
            str(Path(save_dir) / "metrics.jsonl") if save_dir else None
        )
        if metrics_file and ps.rank == 0 and not resumed:
            Path(metrics_file).unlink(missing_ok=True)  # a new run starts a new curve
        self.logger = MetricsLogger(
            metrics_file=metrics_file,
            tensorboard_dir=config.logger.tensorboard_dir,
            log_interval=config.logger.log_interval,
            total_steps=config.train.train_iters,
            progress_bar=config.logger.progress_bar,
            rank=ps.rank,
            start_step=self.iteration,
            console_keys=console_keys,
        )
        return self.logger

    def objective(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], lm_loss: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-batch's objective on the last pipeline stage: ``lm_loss_weight`` times
        the language-model loss plus the plugins' ``mcore_loss_terms``, and the detached
        values to log (``loss`` is the objective; with terms, ``lm_loss`` too)."""
        total = lm_loss * self.lm_loss_weight if self.lm_loss_weight != 1.0 else lm_loss
        logged: dict[str, torch.Tensor] = {}
        for terms in self.hook.mcore_loss_terms(
            trainer=self, model=model, batch=batch, lm_loss=lm_loss
        ):
            for name, value in (terms or {}).items():
                if name in ("loss", "lm_loss") or name in logged:
                    raise McoreError(
                        f"mcore_loss_terms: two terms, or a term and the loop, are named {name!r}"
                    )
                if value.dim() != 0:
                    raise McoreError(
                        f"mcore_loss_terms: term {name!r} has shape {tuple(value.shape)}; "
                        "a term is a scalar (the micro-batch's mean)"
                    )
                total = total + value
                logged[name] = value.detach()
        if logged or self.lm_loss_weight != 1.0:
            logged = {"lm_loss": lm_loss.detach(), **logged}
        return total, {"loss": total.detach(), **logged}

    def reduce_terms(self, metrics: list[dict[str, Any]]) -> dict[str, float]:
        """The step's value of every logged term but ``loss``: the mean over micro-batches
        and data-parallel replicas, known on every rank. Only the last pipeline stage holds
        the terms; their names are learnt from it once."""
        if self._term_names is None:
            names = sorted({k for m in metrics for k in m if k != "loss"})
            ps = self.parallel_state
            if ps.pp_size > 1 and dist.is_initialized():
                stages: list[Any] = [None] * ps.pp_size
                dist.all_gather_object(stages, names, group=ps.pp_group)
                names = sorted({n for stage in stages for n in stage or []})
            self._term_names = names
        return {
            name: self.runtime.reduce_loss([float(m[name]) for m in metrics if name in m])
            for name in self._term_names
        }

    def step_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Add the plugins' ``mcore_step_metrics`` to ``metrics``, refusing a name taken."""
        for extra in self.hook.mcore_step_metrics(trainer=self, step=step):
            for name, value in (extra or {}).items():
                if name in metrics:
                    raise McoreError(
                        f"mcore_step_metrics: {name!r} is already a metric of step {step}; "
                        "name plugin metrics with a prefix (e.g. 'myplugin/...')"
                    )
                metrics[name] = float(value)


def init_distributed(config: Config) -> None:
    """Join the process group torchrun (or ``mcore train --nproc``) set up in the environment."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return
    use_cuda = torch.cuda.is_available() and config.train.device != "cpu"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")


def padded_vocab(vocab_size: int, tp: int) -> int:
    """The model's vocabulary for a tokenizer of ``vocab_size`` tokens: padded to a multiple of
    128 (aligned matmuls) that also splits over TP. Unlike Megatron's 128 x tp, the padded size
    does not change with TP for power-of-two sizes, so the same run under another layout builds
    the same model."""
    multiple = math.lcm(128, tp)
    return math.ceil(vocab_size / multiple) * multiple


def setup_trainer(config: Config, manager: PluginManager, *, command: str = "train") -> Trainer:
    """The start every training command shares: logging, the process group, the parallel
    runtime, the tokenizer and the model config with its vocabulary padded."""
    configure_logging(config.logger.log_level)
    init_distributed(config)
    runtime: TrainingRuntime | None = manager.hook.mcore_training_runtime(config=config)
    if runtime is None:
        raise McoreError(f"mcore {command} needs a parallel runtime: pip install mcore-parallel")
    torch.manual_seed(config.train.seed)
    tokenizer = build_tokenizer(config)
    model_config = config.model
    if model_config.vocab_size is None:
        vocab = padded_vocab(tokenizer.vocab_size, runtime.parallel_state.tp_size)
        model_config = dataclasses.replace(model_config, vocab_size=vocab)
    return Trainer(
        config=config,
        manager=manager,
        runtime=runtime,
        tokenizer=tokenizer,
        model_config=model_config,
        command=command,
    )
