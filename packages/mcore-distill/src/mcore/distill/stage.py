"""A student chunk with its teacher stage beside it, as the pipeline schedule runs it.

Each micro-batch runs the teacher's stage (no gradients) and then the student's. Between
pipeline stages the two models' hidden states travel together, concatenated along the hidden
dimension, through the schedule's own P2P (``pipeline_hidden_size`` is the sum of the widths),
as Megatron's distillation does; the next stage splits them again. On the last stage the
teacher's vocabulary-parallel logits, the student's (taken from its output layer) and the
hidden states of the paired layers wait for the loss hook of the same micro-batch.

The teacher is an attribute, not a submodule: it is not materialised, wrapped, optimised or
checkpointed with the student, and the stage adds no parameters, so checkpoints see the
student's names unchanged.
"""

from __future__ import annotations

from typing import Any, cast

import torch


class DistillationStage(torch.nn.Module):
    """``module`` (a student chunk) with ``teacher`` (the same stage of the teacher): mcore
    models of the ``model`` registry (``config``, ``layers``, ``output_layer``,
    ``set_input_tensor``, ...), typed loosely since any builder's model will do."""

    module: Any
    teacher: Any

    def __init__(
        self,
        student: Any,
        teacher: Any,
        pairs: list[tuple[int, int]] = (),  # type: ignore[assignment]
    ) -> None:
        super().__init__()
        self.module = student
        object.__setattr__(self, "teacher", teacher)  # unregistered: see the module docstring
        self.pipeline_hidden_size = student.config.hidden_size + teacher.config.hidden_size
        if hasattr(student, "init_seed"):
            self.init_seed = student.init_seed  # the runtime reads the weights' seed here
        self.teacher_logits: torch.Tensor | None = None
        self.student_logits: torch.Tensor | None = None
        self.hidden: dict[tuple[str, int], torch.Tensor] = {}
        self._capturing = False
        if getattr(student, "post_process", True):
            student.output_layer.register_forward_hook(self._keep_student_logits)
            for s, t in pairs:
                student.layers[str(s)].register_forward_hook(self._keeper(("student", s)))
                teacher.layers[str(t)].register_forward_hook(self._keeper(("teacher", t)))

    def set_input_tensor(self, tensor: torch.Tensor | list | None) -> None:
        """The previous stage's ``[student | teacher]`` hidden states, split between the two."""
        if isinstance(tensor, (list, tuple)):
            (tensor,) = tensor
        tensor = cast("torch.Tensor | None", tensor)
        if tensor is None:
            self.module.set_input_tensor(None)
            self.teacher.set_input_tensor(None)
            return
        width = self.module.config.hidden_size
        self.module.set_input_tensor(tensor[..., :width])
        teacher_dtype = next(self.teacher.parameters()).dtype
        self.teacher.set_input_tensor(tensor[..., width:].detach().to(teacher_dtype))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        packed_seq_params: Any = None,
        loss_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        last = getattr(self.module, "post_process", True)
        self.teacher_logits = self.student_logits = None
        self.hidden.clear()
        self._capturing = True
        try:
            with torch.no_grad():
                if last:
                    self.teacher_logits = self.teacher.vocab_parallel_logits(
                        input_ids, position_ids, packed_seq_params
                    )
                    teacher_out = None
                else:
                    teacher_out = self.teacher(
                        input_ids, position_ids, packed_seq_params=packed_seq_params
                    )
            out = self.module(
                input_ids,
                position_ids=position_ids,
                labels=labels,
                packed_seq_params=packed_seq_params,
                loss_mask=loss_mask,
            )
        finally:
            self._capturing = False
        if teacher_out is None:
            return out
        return torch.cat([out, teacher_out.to(out.dtype)], dim=-1)

    def _keep_student_logits(self, module: Any, args: Any, output: torch.Tensor) -> None:
        # The first call of a forward is the main head's (multi-token prediction calls it again).
        if self._capturing and self.student_logits is None:
            self.student_logits = output

    def _keeper(self, key: tuple[str, int]):
        def keep(module: Any, args: Any, output: torch.Tensor) -> None:
            # Only in the stage's forward: a recomputed layer's backward rerun is not kept.
            if self._capturing:
                self.hidden[key] = output

        return keep


def find_stage(model: torch.nn.Module) -> DistillationStage | None:
    """The :class:`DistillationStage` inside ``model``'s wrappers (``.module``), if any."""
    current: Any = model
    while current is not None:
        if isinstance(current, DistillationStage):
            return current
        current = getattr(current, "module", None)
    return None
