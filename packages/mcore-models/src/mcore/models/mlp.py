"""The dense MLP: a column-parallel input projection, the activation, a row-parallel output."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mcore.models.context import ModelContext
from mcore.parallel import ColumnParallelLinear, RowParallelLinear


def _squared_relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


class MLP(torch.nn.Module):
    """``fc2(act(fc1(x)))``; with SwiGLU, fc1 fuses the gate and up projections."""

    def __init__(
        self,
        ctx: ModelContext,
        *,
        ffn_hidden_size: int | None = None,
        layer_number: int | None = None,
    ) -> None:
        super().__init__()
        cfg = ctx.config
        ffn = ffn_hidden_size or cfg.ffn_size
        self.gated = cfg.gated_mlp
        self.linear_fc1 = ColumnParallelLinear(
            cfg.hidden_size,
            2 * ffn if self.gated else ffn,
            tp_group=ctx.tp_group,
            bias=cfg.add_bias_linear,
            partitions=[ffn, ffn] if self.gated else None,
            sequence_parallel=ctx.sequence_parallel,
            init_method=ctx.init_method(),
        )
        self.activation = {"swiglu": F.silu, "gelu": F.gelu, "squared_relu": _squared_relu}[
            cfg.activation
        ]
        self.linear_fc2 = RowParallelLinear(
            ffn,
            cfg.hidden_size,
            tp_group=ctx.tp_group,
            bias=cfg.add_bias_linear,
            input_is_parallel=True,
            sequence_parallel=ctx.sequence_parallel,
            init_method=ctx.output_init_method(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_fc1(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.activation(gate) * up
        else:
            h = self.activation(h)
        return self.linear_fc2(h)
