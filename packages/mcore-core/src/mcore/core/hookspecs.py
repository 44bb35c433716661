"""The mcore plugin API: every hook a plugin may implement.

A plugin is a plain module (or object) with a few functions decorated with ``@hookimpl`` and
named after the specs below; it is found through the ``mcore`` entry-point group or registered at
run time with :func:`mcore.core.register_plugin`. These docstrings are the API's documentation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch

    from mcore.core.config import Config, ConfigErrors
    from mcore.core.protocols import Checkpointer, TrainingRuntime
    from mcore.core.registry import PluginRegistrar
    from mcore.core.training.trainer import Trainer

PROJECT = "mcore"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def mcore_register(registry: PluginRegistrar) -> None:
    """Add the plugin's named components to the registries.

    Call ``registry.add(kind, name, obj)`` once per component, e.g.
    ``registry.add("router", "my_router", MyRouter)``. ``kind`` is one of
    :data:`mcore.core.registry.KINDS`. A name another plugin already holds is refused unless
    ``override=True`` is passed. Registration is all-or-nothing per plugin: if this hook raises,
    none of the plugin's components are kept and the error is reported under its name.
    """


@hookspec
def mcore_validate_config(config: Config, errors: ConfigErrors) -> None:
    """Check rules that span config sections, after each section has validated itself.

    Report each problem with ``errors.add("section.field", "what is wrong and what to do")``;
    do not raise. All problems from all plugins are shown to the user together, before any work
    starts.
    """


@hookspec(firstresult=True)
def mcore_training_runtime(config: Config) -> TrainingRuntime | None:
    """Provide the parallel runtime ``mcore train`` runs on, or ``None`` to leave it to others.

    The first non-``None`` result wins. mcore-parallel provides one built from the ``[parallel]``
    section; a plugin with its own layout can return first. The object implements
    :class:`mcore.core.protocols.TrainingRuntime`: ``parallel_state`` (with
    ``dp_rank``/``dp_size``), ``build(config, model_config, registries, *, initialize)
    -> (chunks, optimizer, scheduler)`` (``initialize=False``: a checkpoint is about to be
    loaded, so the model's weights need storage but no initial values),
    ``prepare_batch(batch) -> batch`` (this rank's part of a
    micro-batch), ``forward_backward(...)`` (Megatron's schedule arguments),
    ``finalize_grads(chunks)`` and ``reduce_loss(losses) -> float``; optionally
    ``read_metrics(chunks) -> dict[str, float]`` (:class:`mcore.core.protocols.ReadsMetrics`),
    which the loop calls on every rank at log steps only (statistics gathered on the device
    since the last read).
    """


@hookspec(firstresult=True)
def mcore_checkpointer(config: Config, runtime: TrainingRuntime) -> Checkpointer | None:
    """Provide what ``mcore train`` saves and resumes checkpoints with, or ``None``.

    The first non-``None`` result wins; mcore-ckpt provides one for the formats of the
    ``checkpoint_format`` registry. ``runtime`` is the run's training runtime (its
    ``parallel_state`` names the layout). The object implements
    :class:`mcore.core.protocols.Checkpointer`:

    - ``resume_path() -> Path | None``: the checkpoint ``load`` will read, if any (asked
      before the model is built, so weights about to be loaded are not initialised);
    - ``load(chunks, optimizer, scheduler) -> dict | None``: resume in place from
      ``checkpoint.load`` (or the save directory's latest checkpoint) and return the loop's
      state (``{"iteration": n, "consumed_samples": m}``), or ``None`` when there is nothing to
      resume from;
    - ``save(iteration, chunks, optimizer, scheduler, loop_state) -> str | None``: write a
      checkpoint of the whole training state; returns its published path, or ``None`` while an
      asynchronous save is still being written;
    - ``poll() -> list[str]``: asynchronous saves published since the last call;
    - ``finalize() -> list[str]``: wait for saves in flight; what they published.
    """


@hookspec
def mcore_plan_frozen_models(
    config: Config,
) -> list[tuple[str, Config, Any, torch.dtype]] | None:
    """Models a run of ``config`` holds beside the one it trains, frozen (a distillation
    teacher), for ``mcore plan``: ``(name, run config, model config, dtype)`` each.

    ``mcore plan`` builds every pipeline stage of them on ``meta`` in the run's layout, as the
    model is built, and counts their weights (in ``dtype``) in each rank's memory: no
    gradients, no optimizer state. Read what is needed (a checkpoint's config) but no weights.
    """


# --- the training run ------------------------------------------------------------------------
# Every hook below receives the run's :class:`mcore.core.training.trainer.Trainer` (config,
# parallel runtime, model chunks, optimizer, scheduler, tokenizer, checkpointer, logger,
# iteration), under ``mcore train`` and ``mcore rl`` alike, and is called on every rank.


@hookspec
def mcore_on_model_built(trainer: Trainer, chunks: list[torch.nn.Module]) -> None:
    """Add or wrap modules of this rank's model chunks, right after they are built.

    ``chunks`` are the bare chunks (one per virtual pipeline stage), still on the ``meta``
    device: not yet materialised, wrapped for data parallelism or given to the optimizer.
    Change them in place: add submodules (adapters, projections), replace a layer, or replace
    ``chunks[i]`` by a wrapper. What is added is then treated as the model is: trainable
    parameters are initialised, reduced over data-parallel ranks, optimised and checkpointed;
    frozen ones (``requires_grad=False``) are neither reduced nor optimised. A new ``meta``
    tensor needs an init recipe (``mcore.parallel.init.set_init``); a real tensor is kept as it
    is. A wrapper that keeps the model as ``.module`` and adds no parameters of its own is
    transparent to checkpoints. Objects the run should not train or save (a frozen teacher)
    belong in ``trainer.state``, not in the chunks.
    """


@hookspec
def mcore_loss_terms(
    trainer: Trainer,
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    lm_loss: torch.Tensor,
) -> dict[str, torch.Tensor] | None:
    """Terms to add to one micro-batch's training objective, on the last pipeline stage.

    Called in ``mcore train``'s training steps (not in evaluation), inside the pipeline
    schedule, right after the last stage's forward: ``model`` is the chunk that ran it,
    ``batch`` this rank's micro-batch (``tokens``, ``labels``, ``loss_mask``, ``position_ids``;
    its context-parallel part) and ``lm_loss`` its mean language-model loss, a scalar with its
    graph. Return ``{name: scalar tensor}``: the objective becomes
    ``trainer.lm_loss_weight * lm_loss`` plus every term, backward runs through it, and each
    term is logged under its name (and the LM loss as ``lm_loss``), averaged over micro-batches
    and data-parallel replicas as ``loss`` is. Names must differ from other plugins' terms.
    """


@hookspec
def mcore_step_metrics(trainer: Trainer, step: int) -> dict[str, float] | None:
    """Metrics of the plugin's own for optimizer step ``step``, logged with the step's.

    Called on every rank after the optimizer step, before the step is logged and
    ``mcore_on_step_end`` runs, so a plugin may run collectives here (every rank calls it) and
    should read the device only on steps it reports (``trainer.logger.should_log(step)``).
    Prefix the names (``"myplugin/..."``): a name the loop already uses is an error.
    """


@hookspec
def mcore_on_train_start(trainer: Trainer) -> None:
    """Called once, after the model, optimizer and data are built and before the first step."""


@hookspec
def mcore_on_step_end(trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
    """Called after every optimizer step with the step number (1-based) and its metrics.

    ``metrics`` holds at least ``loss``; the dict is the plugin's to read, not to modify.
    """


@hookspec
def mcore_on_checkpoint_saved(trainer: Trainer, path: str) -> None:
    """Called when a checkpoint has been completely written and published at ``path``."""


@hookspec
def mcore_on_train_end(trainer: Trainer) -> None:
    """Called once when training finishes, also when it stops early on an error."""
