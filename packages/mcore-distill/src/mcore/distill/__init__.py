"""mcore.distill: knowledge distillation as an mcore plugin.

Set ``kd.teacher_load`` and ``mcore train`` distils: the teacher (an mcore checkpoint or a
Hugging Face directory) runs frozen beside the student in its parallel layout, and the logits
KL (and, optionally, hidden-state pairs through learned projections) join the objective through
the ``mcore_loss_terms`` hook. See the package README.
"""

from __future__ import annotations

from mcore.distill.config import KDConfig

__all__ = ["KDConfig"]
