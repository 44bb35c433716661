"""One run's distillation: the teacher stage beside each student chunk, and the loss terms.

The terms of a micro-batch, on the last pipeline stage (``T``: ``kd.logit_temperature``)::

    logits  = T^2 * mean over the loss mask of KL(softmax(teacher / T) || softmax(student / T))
    layer   = mean over tokens of loss(P student_hidden, teacher_hidden)   (per pair; P learned)
    kd      = kd_loss_scale * (logits + intermediate_loss_scale * sum(layer))

with ``kd.dynamic_loss_balance`` each layer term first rescaled to the logits term's magnitude
and the sum to the LM loss's. The terms are returned scaled, so what is logged
(``kd/logits``, ``kd/layer_S_T``) is what is optimised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from mcore.core import McoreError
from mcore.distill.losses import (
    balanced,
    hidden_state_loss,
    masked_mean,
    vocab_parallel_kl,
)
from mcore.distill.stage import DistillationStage, find_stage
from mcore.distill.teacher import load_teacher


@dataclass
class Distiller:
    """What ``mcore_on_model_built`` set up for this rank, read by ``mcore_loss_terms``."""

    kd: Any
    parallel_state: Any
    sequence_parallel: bool
    teacher: torch.nn.Module
    pairs: list[tuple[int, int]] = field(default_factory=list)
    projections: dict[str, torch.nn.Module] = field(default_factory=dict)

    @classmethod
    def build(cls, trainer: Any, kd: Any, chunks: list[torch.nn.Module]) -> Distiller:
        """Read the teacher, check it against the student, wrap ``chunks`` in place."""
        if len(chunks) != 1:
            raise McoreError("kd.teacher_load: distillation supports one model chunk per rank")
        # An mcore model of the ``model`` registry (``config``, ``layers``, ``post_process``,
        # ...), typed loosely: any builder's model will do.
        student: Any = chunks[0]
        teacher: Any = load_teacher(trainer, kd)
        vocab, student_vocab = teacher.config.vocab_size, student.config.vocab_size
        if vocab != student_vocab:
            raise McoreError(
                f"kd.teacher_load: the teacher's vocabulary has {vocab} entries, the student's "
                f"{student_vocab}: logits distillation needs the same tokenizer (and padding)"
            )
        pairs = kd.pairs()
        _check_pairs(pairs, student, teacher, trainer.parallel_state)
        ps = trainer.parallel_state
        sp = bool(trainer.config.parallel.sequence_parallel)
        distiller = cls(kd, ps, sp, teacher, pairs)
        if pairs and student.post_process:
            distiller._add_projections(student, teacher)
        chunks[0] = DistillationStage(student, teacher, pairs if student.post_process else [])
        return distiller

    def _add_projections(self, student: Any, teacher: Any) -> None:
        """A learned ``student hidden -> teacher hidden`` map per pair, a student submodule
        (trained, reduced and saved with it: ``kd_projections.S_T.weight``)."""
        from mcore.parallel.grads import mark_tp_partial_grad
        from mcore.parallel.init import set_init

        std = getattr(student.config, "init_method_std", 0.02)
        modules = torch.nn.ModuleDict()
        for s, t in self.pairs:
            proj = torch.nn.Linear(
                student.config.hidden_size, teacher.config.hidden_size, bias=False, device="meta"
            )
            set_init(proj.weight, lambda w, std=std: torch.nn.init.normal_(w, std=std))
            if self.sequence_parallel:  # each TP rank sees its part of the sequence
                mark_tp_partial_grad(proj.weight)
            modules[f"{s}_{t}"] = proj
        student.add_module("kd_projections", modules)
        self.projections = dict(modules.items())

    def loss_terms(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], lm_loss: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        stage = find_stage(model)
        if stage is None or stage.student_logits is None or stage.teacher_logits is None:
            raise McoreError(
                "mcore-distill: the micro-batch's logits were not captured; is the model "
                "chunk still the DistillationStage that mcore_on_model_built made?"
            )
        kd = self.kd
        tp_group = self.parallel_state.tp_group
        temperature = kd.logit_temperature
        per_token = vocab_parallel_kl(
            stage.student_logits, stage.teacher_logits, temperature, tp_group
        )  # [s, b]
        logits = temperature**2 * masked_mean(per_token, batch["loss_mask"].t())
        stage.student_logits = stage.teacher_logits = None  # let the micro-batch's memory go
        layers = {}
        for s, t in self.pairs:
            hidden = stage.hidden.pop(("student", s))
            target = stage.hidden.pop(("teacher", t))
            projected = self.projections[f"{s}_{t}"](hidden)
            term = hidden_state_loss(projected, target, kd.intermediate_loss).float().mean()
            if self.sequence_parallel:  # the mean over the whole sequence, split over TP
                term = _tp_mean(term, tp_group)
            if kd.dynamic_loss_balance:
                term = balanced(term, logits)
            layers[f"kd/layer_{s}_{t}"] = kd.intermediate_loss_scale * term
        scale = kd.kd_loss_scale
        if kd.dynamic_loss_balance:
            total = logits + sum(layers.values(), torch.zeros_like(logits))
            scale = scale * (lm_loss.detach() / total.detach().clamp(min=1e-12))
        return {"kd/logits": scale * logits, **{k: scale * v for k, v in layers.items()}}


def _tp_mean(local: torch.Tensor, group: Any) -> torch.Tensor:
    """The mean over TP ranks of per-rank means of equal parts: the forward all-reduces; the
    backward leaves each rank's gradient to its own part (the ranks' terms sum to the whole)."""
    from mcore.parallel.tensor_parallel.mappings import reduce_from_tensor_parallel_region

    size = dist.get_world_size(group) if group is not None else 1
    return reduce_from_tensor_parallel_region(local / size, group)


def _check_pairs(
    pairs: list[tuple[int, int]],
    student: Any,
    teacher: Any,
    ps: Any,
) -> None:
    """Every pair names existing layers that sit on the last pipeline stage (all ranks learn
    the last stage's layers, so all refuse alike, before any step)."""
    if not pairs:
        return
    for who, model, index in (("student", student, 0), ("teacher", teacher, 1)):
        count = model.config.num_layers
        for pair in pairs:
            if pair[index] >= count:
                raise McoreError(
                    f"kd.intermediate_pairs: {pair[0]}:{pair[1]} names {who} layer "
                    f"{pair[index]}, but the {who} has {count} layers (0-{count - 1})"
                )
    mine = (
        sorted(int(k) for k in student.layers) if student.post_process else None,
        sorted(int(k) for k in teacher.layers) if teacher.post_process else None,
    )
    last: Any = mine  # the last stage's (student, teacher) layer numbers
    if ps.pp_size > 1 and dist.is_initialized():
        stages: list[Any] = [None] * ps.pp_size
        dist.all_gather_object(stages, mine, group=ps.pp_group)
        last = next(stage for stage in stages if stage[0] is not None)
    for s, t in pairs:
        if s not in last[0] or t not in last[1]:
            raise McoreError(
                f"kd.intermediate_pairs: {s}:{t} is not on the last pipeline stage, which holds "
                f"student layers {last[0]} and teacher layers {last[1]}; layer pairs are "
                "compared where the loss is computed"
            )
