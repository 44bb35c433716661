"""The routed experts of one MoE layer, and the shared expert.

:class:`GroupedMLP` holds all of this rank's experts as two stacked weights,
``linear_fc1.weight`` ``[local_experts, 2F/etp or F/etp, hidden]`` and ``linear_fc2.weight``
``[local_experts, hidden, F/etp]``, and runs them in one grouped matmul each
(``torch._grouped_mm``, CPU and GPU) or, as the reference, in a loop over experts with the same
weights. Under expert tensor parallelism (ETP) fc1 is split by output rows and fc2 by input
columns, so each rank's fc2 output is partial; the dispatcher's combine sums it over ETP.

One seed gives the same experts under any EP and ETP layout, and no rank draws the full stacks:
each fills only its experts' shards from counter-based tiles (:mod:`mcore.parallel.init`).
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F

from mcore.models import ModelContext
from mcore.models.mlp import MLP
from mcore.moe.activations import weighted_squared_relu
from mcore.moe.config import MoEConfig
from mcore.parallel import mark_expert_parallel, mark_tp_partial_grad
from mcore.parallel.init import init_tensor
from mcore.parallel.sharding import Layout


class _GroupedMM(torch.autograd.Function):
    """``torch._grouped_mm`` of ``[rows, k]`` by ``[groups, k, n]`` with a backward that takes
    gradients of any layout (the built-in one needs them contiguous)."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b, offs)
        return torch._grouped_mm(a, b, offs=offs)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        a, b, offs = ctx.saved_tensors
        grad = grad.contiguous()
        grad_a = torch._grouped_mm(grad, b.transpose(-2, -1), offs=offs)
        # Per group a_g^T @ grad_g, computed transposed so it lands in the weight's own layout
        # (b is a transposed view of it) and autograd need not copy it.
        grad_b = torch._grouped_mm(grad.t(), a, offs=offs).transpose(-2, -1)
        return grad_a, grad_b, None


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up`` of ``h = [gate | up]``, bit for bit as autograd computes it, with
    fewer and smaller buffers: only ``h`` is saved (autograd also keeps ``silu(gate)``, which the
    backward recomputes here), the forward writes its product in place, and the backward writes
    both halves' gradients straight into one ``[rows, 2F]`` tensor, where autograd allocates
    three ``[rows, F]`` temporaries and concatenates two of them. On a CPU every fresh buffer
    this large is paid again in page faults, so this is faster as well as leaner."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h)
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        (h,) = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        grad_h = torch.empty_like(h)
        grad_gate, grad_up = grad_h.chunk(2, dim=-1)
        torch.mul(grad, up, out=grad_gate)
        torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        torch.ops.aten.silu.out(gate, out=grad_up)
        grad_up.mul_(grad)
        return grad_h


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` with ``h = [gate | up]`` along the last dim (see :class:`_SwiGLU`)."""
    # Compiled, the plain expression is better: the compiler fuses its backward (and dynamo
    # cannot trace the strided ``out=`` writes of ours).
    if torch.compiler.is_compiling() or not (torch.is_grad_enabled() and h.requires_grad):
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return _SwiGLU.apply(h)


def _aligned(n: int, dtype: torch.dtype) -> int:
    """``n`` rounded up so a row of ``n`` elements spans a multiple of 16 bytes, as grouped
    GEMMs require of every stride."""
    per = max(1, 16 // torch.empty((), dtype=dtype).element_size())
    return -(-n // per) * per


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` ``[rows, in]``, expert by expert (``counts`` rows each), times each
    expert's ``weight[e]`` ``[out, in]`` transposed: ``[rows, out]``.

    Sizes whose rows are not 16-byte aligned are zero-padded for the GEMM and cut back after.
    ``counts`` may stay on the device (no host read); rows past their sum come out undefined.
    """
    out_features, in_features = weight.shape[1:]
    k, n = _aligned(in_features, x.dtype), _aligned(out_features, x.dtype)
    if (k, n) != (in_features, out_features):
        x = F.pad(x, (0, k - in_features))
        weight = F.pad(weight, (0, k - in_features, 0, n - out_features))
    offs = counts.to(device=x.device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    y = _GroupedMM.apply(x.contiguous(), weight.transpose(1, 2), offs)
    return y[:, :out_features] if n != out_features else y


def _looped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The reference for :func:`grouped_linear`: one matmul per expert (it reads ``counts`` on
    the host). Rows past the counted ones (a dispatcher's padding) come out zero."""
    sizes = counts.tolist()
    *chunks, padding = x.split([*sizes, x.shape[0] - sum(sizes)], dim=0)
    outs = [F.linear(c, weight[e]) for e, c in enumerate(chunks)]
    return torch.cat([*outs, padding.new_zeros(padding.shape[0], weight.shape[1])], dim=0)


class GroupedMLP(torch.nn.Module):
    """This rank's routed experts: ``fc2(act(fc1(x)))`` per expert, all at once."""

    def __init__(self, ctx: ModelContext, moe: MoEConfig, *, num_local_experts: int) -> None:
        super().__init__()
        cfg, ps = ctx.config, ctx.parallel_state
        ffn = moe.ffn_hidden_size or cfg.ffn_size
        if ffn % ps.etp_size:
            raise ValueError(
                f"moe.ffn_hidden_size ({ffn}) does not divide over "
                f"parallel.expert_tensor_parallel_size={ps.etp_size}"
            )
        if cfg.add_bias_linear:
            raise NotImplementedError("MoE experts have no biases: set model.add_bias_linear false")
        self.gated = cfg.gated_mlp
        self.activation_name = cfg.activation
        self.grouped = moe.grouped_gemm
        self.fused = moe.permute_fusion
        self.num_local_experts = num_local_experts
        self._ep = (ps.ep_rank, ps.ep_size)
        self._etp = (ps.etp_rank, ps.etp_size)
        fc1_rows = (2 * ffn if self.gated else ffn) // ps.etp_size
        self.linear_fc1 = torch.nn.Module()
        self.linear_fc1.weight = torch.nn.Parameter(
            torch.empty(num_local_experts, fc1_rows, cfg.hidden_size)
        )
        self.linear_fc2 = torch.nn.Module()
        self.linear_fc2.weight = torch.nn.Parameter(
            torch.empty(num_local_experts, cfg.hidden_size, ffn // ps.etp_size)
        )
        # Each rank fills only its experts' shards of the full stacks (see mcore.parallel.init).
        for name, method in (
            ("linear_fc1.weight", ctx.init_method()),
            ("linear_fc2.weight", ctx.output_init_method()),
        ):
            init_tensor(self.get_parameter(name), method, self.shard_layout(name))
        mark_expert_parallel(self.linear_fc1.weight, self.linear_fc2.weight)

    def shard_layout(self, name: str) -> Layout | None:
        """Where this rank's stacked expert weights sit in the full ``[experts, ...]`` stacks
        (checkpoints): its experts along dim 0 (EP), its ETP block of each along fc1's rows
        (gate and up halves split alike) or fc2's columns."""
        if name == "linear_fc1.weight":
            shape = tuple(self.get_parameter(name).shape)
            halves = [shape[1] // 2] * 2 if self.gated else None
            return Layout.split(shape, {0: (*self._ep, None), 1: (*self._etp, halves)})
        if name == "linear_fc2.weight":
            shape = tuple(self.get_parameter(name).shape)
            return Layout.split(shape, {0: (*self._ep, None), 2: (*self._etp, None)})
        return None

    @property
    def applies_probs(self) -> bool:
        """Squared-ReLU experts weight rows by their probability inside the activation (one
        fused kernel); the others leave it to the dispatcher's combine."""
        return self.activation_name == "squared_relu"

    def forward(
        self, x: torch.Tensor, tokens_per_expert: torch.Tensor, probs: torch.Tensor
    ) -> torch.Tensor:
        """``[rows, hidden]`` expert by expert -> ``[rows, hidden]`` (partial under ETP)."""
        linear = grouped_linear if self.grouped else _looped_linear
        # Bare modules holding the stacked weights (typed as submodules by torch).
        w1 = cast("torch.Tensor", self.linear_fc1.weight)
        w2 = cast("torch.Tensor", self.linear_fc2.weight)
        h = linear(x, w1.to(x.dtype), tokens_per_expert)
        if self.gated:
            h = swiglu(h)
        elif self.activation_name == "squared_relu":
            h = weighted_squared_relu(h, probs, fused=self.fused)
        else:
            h = F.gelu(h)
        return linear(h, w2.to(x.dtype), tokens_per_expert)


class SharedExpertMLP(MLP):
    """The shared expert every token passes through: the dense tensor-parallel MLP, optionally
    scaled by ``sigmoid(gate_weight . x)`` (Qwen2-MoE)."""

    def __init__(self, ctx: ModelContext, moe: MoEConfig) -> None:
        super().__init__(ctx, ffn_hidden_size=moe.shared_expert_intermediate_size)
        self.gate_weight = None
        if moe.shared_expert_gate:
            self.gate_weight = torch.nn.Parameter(torch.empty(1, ctx.config.hidden_size))
            init_tensor(self.gate_weight, ctx.init_method())
            if ctx.sequence_parallel:
                mark_tp_partial_grad(self.gate_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.gate_weight is not None:
            out = out * torch.sigmoid(F.linear(x, self.gate_weight.to(x.dtype)))
        return out
