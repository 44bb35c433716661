"""The gated delta net of Qwen3-Next (layer symbol ``G``): linear attention with a delta rule.

``x [s, b, h]`` is projected to queries and keys (``nk`` heads of ``dk``), values and an output
gate ``z`` (``nv`` heads of ``dv``), and per value head a write strength ``beta = sigmoid(b)``
and a decay ``g = -exp(A_log) * softplus(a + dt_bias)``. Queries, keys and values pass a causal
depthwise convolution and SiLU; the gated delta rule (:mod:`mcore.ssm.gated_delta`) keeps a
``[dk, dv]`` state per value head; each head's output is RMS-normalised, scaled by the norm
weight (one ``dv`` vector shared by the heads), gated by ``silu(z)`` and projected back.

The projections keep Hugging Face's layout: ``in_proj_qkvz`` rows are grouped per key head as
``[q, k, v, z]`` of that head's share, ``in_proj_ba`` rows as ``[b, a]``. Whole key-head groups
are thus contiguous, so tensor parallelism splits both projections evenly by rows (``nk`` must
divide over TP); the convolution (``[q | k | v]`` channels, each split on its own), ``dt_bias``
and ``A_log`` split alike and are marked ``tensor_model_parallel``; the shared norm weight is
replicated and its per-rank gradients summed over TP. Context parallelism is refused.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mcore.models.context import ModelContext, mark_tp_partial_grad
from mcore.models.inference import PagedBatch, RecurrentStateSpec
from mcore.models.packing import PackedSeqParams
from mcore.parallel import ColumnParallelLinear, RowParallelLinear
from mcore.parallel.init import ONES, init_tensor
from mcore.parallel.sharding import Layout
from mcore.ssm.conv import causal_conv1d, causal_conv1d_step
from mcore.ssm.mamba import (
    a_log_init,
    check_tp_divisible,
    dt_bias_init,
    mark_tensor_parallel,
    refuse_context_parallel,
    sequence_ids,
    ssm_section,
    uniform,
)
from mcore.ssm.scan import scan_functions


class HeadGatedRMSNorm(torch.nn.Module):
    """``rmsnorm(y) * weight * silu(z)`` per head (norm before gate, Qwen3-Next's order)."""

    def __init__(self, head_dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.empty(head_dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        h = y.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = self.weight * h.to(dtype)
        return (h * F.silu(z.float())).to(dtype)


class GatedDeltaNet(torch.nn.Module):
    """Qwen3-Next's linear-attention mixer; ``forward(x [s, b, h]) -> [s, b, h]``."""

    def __init__(self, ctx: ModelContext, *, layer_number: int) -> None:
        super().__init__()
        cfg, ps, ssm = ctx.config, ctx.parallel_state, ssm_section(ctx)
        refuse_context_parallel(ctx, "gated delta net (G)")
        nk, nv = ssm.linear_num_key_heads, ssm.linear_num_value_heads
        if nv % nk:
            raise ValueError(f"gated delta net: {nv} value heads are not a multiple of {nk}")
        check_tp_divisible(ctx, linear_num_key_heads=nk)
        self.tp_rank, self.tp_size = ps.tp_rank, ps.tp_size
        self.layer_number = layer_number
        self.dk, self.dv = ssm.linear_key_head_dim, ssm.linear_value_head_dim
        self.local_k, self.local_v = nk // ps.tp_size, nv // ps.tp_size
        self.ratio = nv // nk
        self.chunk_size = ssm.linear_chunk_size
        self.kernel = ssm.ssm_kernel
        key_dim, value_dim = nk * self.dk, nv * self.dv
        self.in_proj_qkvz = ColumnParallelLinear(
            cfg.hidden_size,
            2 * key_dim + 2 * value_dim,
            tp_group=ctx.tp_group,
            bias=False,
            sequence_parallel=ctx.sequence_parallel,
            init_method=ctx.init_method(),
        )
        self.in_proj_ba = ColumnParallelLinear(
            cfg.hidden_size,
            2 * nv,
            tp_group=ctx.tp_group,
            bias=False,
            sequence_parallel=ctx.sequence_parallel,
            init_method=ctx.init_method(),
        )
        k = ssm.linear_conv_kernel_dim
        self.conv_channels = [
            self.local_k * self.dk,
            self.local_k * self.dk,
            self.local_v * self.dv,
        ]
        conv_dim = sum(self.conv_channels)
        self.conv1d = torch.nn.Conv1d(
            conv_dim, conv_dim, k, groups=conv_dim, bias=False, padding=k - 1
        )
        bound = 1.0 / math.sqrt(k)
        init_tensor(self.conv1d.weight, uniform(-bound, bound), self.shard_layout("conv1d.weight"))
        self.dt_bias = torch.nn.Parameter(torch.empty(self.local_v))
        init_tensor(
            self.dt_bias,
            dt_bias_init(ssm.mamba_dt_min, ssm.mamba_dt_max, ssm.mamba_dt_init_floor),
            self.shard_layout("dt_bias"),
        )
        self.A_log = torch.nn.Parameter(torch.empty(self.local_v))
        init_tensor(self.A_log, a_log_init(), self.shard_layout("A_log"))
        self.norm = HeadGatedRMSNorm(self.dv, cfg.norm_epsilon)
        init_tensor(self.norm.weight, ONES)
        self.out_proj = RowParallelLinear(
            value_dim,
            cfg.hidden_size,
            tp_group=ctx.tp_group,
            bias=False,
            input_is_parallel=True,
            sequence_parallel=ctx.sequence_parallel,
            init_method=ctx.output_init_method(),
        )
        if ps.tp_size > 1:
            mark_tensor_parallel(self.conv1d.weight, self.dt_bias, self.A_log)
            mark_tp_partial_grad(self.norm.weight)  # shared by heads that live on every rank

    def shard_layout(self, name: str) -> Layout | None:
        """This rank's share of the conv (``[q | k | v]`` split on their own), ``dt_bias`` and
        ``A_log`` (value heads) in the full tensors."""
        if name == "conv1d.weight":
            shape = (sum(self.conv_channels), 1, self.conv1d.kernel_size[0])
            return Layout.split(shape, {0: (self.tp_rank, self.tp_size, self.conv_channels)})
        if name in ("dt_bias", "A_log"):
            return Layout.split((self.local_v,), {0: (self.tp_rank, self.tp_size, None)})
        return None

    def recurrent_state_spec(self) -> RecurrentStateSpec:
        """Per request: the conv state of q, k, v and the ``[dk, dv]`` state per value head."""
        k = self.conv1d.kernel_size[0]
        return RecurrentStateSpec(
            shapes=((sum(self.conv_channels), k - 1), (self.local_v, self.dk, self.dv)),
            float32=(False, True),
        )

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``x [..., h]`` -> ``qkv [..., conv channels]`` (the conv's input), ``z [..., nv, dv]``,
        ``b``, ``a`` ``[..., nv]`` (this rank's heads), from HF's per-key-head grouping."""
        qkvz = self.in_proj_qkvz(x).unflatten(-1, (self.local_k, -1))
        ba = self.in_proj_ba(x).unflatten(-1, (self.local_k, -1))
        r, dk, dv = self.ratio, self.dk, self.dv
        q, k, v, z = qkvz.split([dk, dk, r * dv, r * dv], dim=-1)
        b, a = ba.split([r, r], dim=-1)
        qkv = torch.cat([q.flatten(-2), k.flatten(-2), v.flatten(-2)], dim=-1)
        return qkv, z.reshape(*z.shape[:-2], self.local_v, dv), b.flatten(-2), a.flatten(-2)

    def _heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = qkv.split(self.conv_channels, dim=-1)
        q = q.unflatten(-1, (self.local_k, self.dk)).repeat_interleave(self.ratio, dim=-2)
        k = k.unflatten(-1, (self.local_k, self.dk)).repeat_interleave(self.ratio, dim=-2)
        return q, k, v.unflatten(-1, (self.local_v, self.dv))

    def _gates(self, b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        beta = torch.sigmoid(b.float())
        g = -torch.exp(self.A_log.float()) * F.softplus(a.float() + self.dt_bias.float())
        return g, beta

    def forward(
        self,
        x: torch.Tensor,
        *,
        paged: PagedBatch | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if paged is not None:
            return self._forward_paged(x, paged)
        # Project sequence-first: under sequence parallelism the projections gather dim 0.
        qkv, z, b, a = (t.transpose(0, 1) for t in self._project(x))  # [b, s, *]
        batch, s = qkv.shape[:2]
        seq_idx = sequence_ids(packed_seq_params, batch, s)
        qkv = causal_conv1d(qkv, self.conv1d.weight.squeeze(1), None, seq_idx=seq_idx)
        q, k, v = self._heads(qkv)
        g, beta = self._gates(b, a)
        scan, _ = scan_functions(self.kernel, "gdn")
        kwargs = {} if seq_idx is None else {"seq_idx": seq_idx}
        o = scan(q, k, v, g, beta, chunk_size=self.chunk_size, **kwargs)
        o = self.norm(o, z).flatten(-2)
        return self.out_proj(o.transpose(0, 1))

    def _forward_paged(self, x: torch.Tensor, paged: PagedBatch) -> torch.Tensor:
        """The engine's flat token row ``[T, 1, h]``: decode steps, then prefill chunks."""
        qkv, z, b, a = self._project(x[:, 0])  # [T, *]
        num_tokens = qkv.shape[0]
        conv_states, states = paged.layer_states(self.layer_number)
        out = qkv.new_zeros(num_tokens + 1, self.local_v, self.dv)
        weight = self.conv1d.weight.squeeze(1)
        scan, step = scan_functions(self.kernel, "gdn")
        nd = paged.num_decode
        if nd:
            slots = paged.decode_state_slots
            assert slots is not None  # a batch over recurrent state carries its slots
            conv = conv_states.index_select(0, slots)
            state = states.index_select(0, slots)
            mixed = causal_conv1d_step(qkv[:nd], conv, weight, None)
            q, k, v = self._heads(mixed)
            g, beta = self._gates(b[:nd], a[:nd])
            o = step(state, q, k, v, g, beta)
            conv_states.index_copy_(0, slots, conv)
            states.index_copy_(0, slots, state)
            out[:nd] = self.norm(o, z[:nd])
        if paged.num_prefill:
            rows, valid = paged.prefill_query_rows, paged.prefill_rows_valid()
            slots = paged.prefill_state_slots
            assert slots is not None  # a batch over recurrent state carries its slots

            def pad(t: torch.Tensor) -> torch.Tensor:
                return torch.cat([t, t.new_zeros(1, *t.shape[1:])])[rows]

            mixed, conv_final = causal_conv1d(
                pad(qkv),
                weight,
                None,
                initial_state=conv_states.index_select(0, slots),
                lengths=valid.sum(1),
                return_final_state=True,
            )
            q, k, v = self._heads(mixed)
            g, beta = self._gates(pad(b), pad(a))
            keep = valid.unsqueeze(-1)
            # Padding neither decays (g = 0) nor writes (beta = 0): the state passes unchanged.
            o, final = scan(
                q,
                k,
                v,
                g * keep,
                beta * keep,
                chunk_size=self.chunk_size,
                initial_state=states.index_select(0, slots),
                return_final_state=True,
            )
            conv_states.index_copy_(0, slots, conv_final.to(conv_states.dtype))
            states.index_copy_(0, slots, final)
            o = self.norm(o, pad(z))
            out.index_copy_(0, rows.reshape(-1), o.reshape(-1, *o.shape[2:]))
        return self.out_proj(out[:num_tokens].flatten(-2).unsqueeze(1))


def gated_delta_net_layer_spec(config) -> object:
    """The ``G`` symbol: a gated-delta-net mixer layer (no MLP)."""
    from mcore.models.layer import LayerSpec

    return LayerSpec(attention=None, mlp=None, mixer="gated_delta_net")
