"""The ``[kd]`` config section: the teacher, the distillation losses and how they are weighed.

Setting ``kd.teacher_load`` turns distillation on for ``mcore train``. The objective of a
micro-batch is ``lm_loss + kd_loss_scale * (logits KL + intermediate_loss_scale * sum of the
layer-pair losses)`` (Megatron / ModelOpt's ``kd_loss_scale``, ``logit_layers`` and
``intermediate_layer_pairs``), the LM loss dropped with ``skip_lm_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mcore.core import ConfigErrors


@dataclass(kw_only=True)
class KDConfig:
    """Knowledge distillation from a frozen teacher run in the student's parallel layout."""

    teacher_load: str | None = field(
        default=None, metadata={"megatron": "--export-kd-teacher-load"}
    )
    """The teacher: an mcore checkpoint (a save directory or one iter_N folder) or a Hugging
    Face model directory (config.json and safetensors). Setting it turns distillation on."""
    teacher_model: dict[str, Any] = field(default_factory=dict)
    """Fields of the teacher's [model] config to change, e.g. {attention_backend = "torch"};
    by default the teacher's config is the one its checkpoint carries (an mcore checkpoint's
    saved config, a Hugging Face directory's config.json)."""
    teacher_bf16: bool = False
    """Hold and run the teacher in bfloat16 (half its memory); its logits are compared in
    fp32."""
    logit_temperature: float = 1.0
    """Temperature T of the logits KL: KL(softmax(teacher / T) || softmax(student / T)) per
    token, times T^2 so the gradients' scale does not change with T (Hinton et al.)."""
    kd_loss_scale: float = 1.0
    """Weight of the distillation loss (logits KL plus layer pairs) beside the LM loss."""
    dynamic_loss_balance: bool = False
    """Rescale each micro-batch's distillation loss to the LM loss's magnitude before
    kd_loss_scale weighs it (and each layer pair's loss to the logits KL's), so the scales are
    ratios of magnitudes; the gradients' directions are unchanged."""
    skip_lm_loss: bool = False
    """Train on the distillation loss alone (the LM loss is still logged, as lm_loss)."""
    intermediate_pairs: list[str] = field(default_factory=list)
    """Hidden-state pairs 'STUDENT:TEACHER' of 0-based global layer indices, e.g. 3:7, whose
    outputs are compared through a learned linear projection of the student's (both layers
    must sit on the last pipeline stage)."""
    intermediate_loss: Literal["cosine", "mse"] = "cosine"
    """Loss of a layer pair per token: 1 - cosine similarity, or the mean squared error."""
    intermediate_loss_scale: float = 1.0
    """Weight of each layer pair's loss beside the logits KL."""

    @property
    def enabled(self) -> bool:
        return self.teacher_load is not None

    def pairs(self) -> list[tuple[int, int]]:
        """``intermediate_pairs`` as ``(student, teacher)`` layer indices."""
        return [_pair(text) for text in self.intermediate_pairs]

    def validate(self, errors: ConfigErrors) -> None:
        if self.logit_temperature <= 0:
            errors.add("logit_temperature", f"must be > 0, got {self.logit_temperature}")
        for name in ("kd_loss_scale", "intermediate_loss_scale"):
            if getattr(self, name) < 0:
                errors.add(name, f"must be >= 0, got {getattr(self, name)}")
        for text in self.intermediate_pairs:
            try:
                _pair(text)
            except ValueError as exc:
                errors.add("intermediate_pairs", str(exc))
        if self.skip_lm_loss and self.dynamic_loss_balance:
            errors.add(
                "dynamic_loss_balance",
                "balances the distillation loss against the LM loss, which kd.skip_lm_loss "
                "drops: use one of the two",
            )
        if not self.enabled:
            for name in ("intermediate_pairs", "teacher_model", "skip_lm_loss"):
                if getattr(self, name):
                    errors.add(name, "is set, but kd.teacher_load is not: there is no teacher")


def _pair(text: str) -> tuple[int, int]:
    student, sep, teacher = str(text).partition(":")
    try:
        if not sep:
            raise ValueError
        pair = int(student), int(teacher)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a 'STUDENT:TEACHER' pair of layer indices (e.g. 3:7)"
        ) from None
    if min(pair) < 0:
        raise ValueError(f"{text!r}: layer indices count from 0")
    return pair
