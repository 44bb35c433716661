"""The Mamba-2 mixer (layer symbol ``M``): in-projection, causal conv, SSD scan, gated norm.

``x [s, b, h]`` is projected to the gate ``z``, the scan input ``x`` with its ``B`` and ``C``
(``G`` groups of ``N``), and one time step ``dt`` per head; ``x, B, C`` go through a causal
depthwise convolution and SiLU; the SSD scan runs ``H`` heads of ``P`` channels with decay
``A = -exp(A_log)``, step ``softplus(dt + dt_bias)`` and skip ``D``; the output is normalised
group-wise after gating with ``silu(z)`` and projected back.

Tensor parallelism splits heads and groups (``H`` and ``G`` must divide over TP): the
in-projection is column-parallel with each of ``z, x, B, C, dt`` split on its own, the
convolution, ``dt_bias``, ``A_log``, ``D`` and the norm weight are split alike (and marked
``tensor_model_parallel``, so gradient clipping counts each rank's share once), and the
out-projection is row-parallel. With sequence parallelism the in-projection gathers the
sequence and the out-projection scatters it, as around attention. Context parallelism would
need the state passed between ranks along the sequence; it is refused.

At inference (``paged=``) each request keeps a conv state and an SSM state in its slot of the
engine's state tensors: decode tokens take one recurrent step, prefill chunks run the chunked
scan from the slot's state (right padding is given ``dt = 0``, which leaves the state as is).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mcore.models.context import ModelContext
from mcore.models.inference import PagedBatch, RecurrentStateSpec
from mcore.models.packing import PackedSeqParams
from mcore.parallel import (
    ColumnParallelLinear,
    ParallelLayoutError,
    RowParallelLinear,
)
from mcore.parallel.init import ONES, ZEROS, Init, init_tensor
from mcore.parallel.sharding import Layout
from mcore.ssm.config import SSMConfig
from mcore.ssm.conv import causal_conv1d, causal_conv1d_step
from mcore.ssm.scan import scan_functions


def ssm_section(ctx: ModelContext) -> SSMConfig:
    """The model's ``[ssm]`` section, or the defaults when the model was built without one."""
    return ctx.sections.get("ssm") or SSMConfig()


def refuse_context_parallel(ctx: ModelContext, what: str) -> None:
    if ctx.parallel_state.cp_size > 1:
        raise ParallelLayoutError(
            f"{what} layers do not support context parallelism (the recurrent state would have "
            f"to pass between ranks along the sequence): set "
            f"parallel.context_parallel_size = 1 (it is {ctx.parallel_state.cp_size})"
        )


def check_tp_divisible(ctx: ModelContext, **sizes: int) -> None:
    """Raise naming the ``[ssm]`` field whose size does not split over TP."""
    tp = ctx.parallel_state.tp_size
    for name, size in sizes.items():
        if size % tp:
            raise ParallelLayoutError(
                f"ssm.{name} = {size} does not divide over parallel.tensor_model_parallel_size "
                f"= {tp}"
            )


def mark_tensor_parallel(*params: torch.Tensor) -> None:
    """Megatron's marking: these parameters are split over TP (clipping counts each share)."""
    for p in params:
        p.tensor_model_parallel = True  # pyright: ignore[reportAttributeAccessIssue]


def uniform(low: float, high: float) -> Init:
    return Init(lambda t: torch.nn.init.uniform_(t, low, high))


def dt_bias_init(dt_min: float, dt_max: float, floor: float) -> Init:
    """``dt_bias`` such that ``softplus(dt_bias)`` is log-uniform in ``[dt_min, dt_max]``."""

    def fill(t: torch.Tensor) -> None:
        with torch.no_grad():
            u = torch.rand(t.shape, dtype=torch.float32, device=t.device)
            dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=floor)
            t.copy_(dt + torch.log(-torch.expm1(-dt)))  # the inverse of softplus

    return Init(fill)


def a_log_init() -> Init:
    """``A_log = log(A)`` with ``A`` uniform in ``[1, 16]`` (Mamba-2's default range)."""

    def fill(t: torch.Tensor) -> None:
        with torch.no_grad():
            t.copy_(
                torch.empty(t.shape, dtype=torch.float32, device=t.device).uniform_(1, 16).log()
            )

    return Init(fill)


class GroupedGatedRMSNorm(torch.nn.Module):
    """``rmsnorm(y * silu(z))`` over groups of ``group_size`` channels, times ``weight``."""

    def __init__(self, size: int, group_size: int, eps: float) -> None:
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = torch.nn.Parameter(torch.empty(size))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        h = y.float() * F.silu(z.float())
        g = h.unflatten(-1, (-1, self.group_size))
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.flatten(-2).to(dtype)


def sequence_ids(packed: PackedSeqParams | None, batch: int, seq: int) -> torch.Tensor | None:
    """``seq_idx [b, s]`` of packed rows (nondecreasing; padding continues as its own id)."""
    if packed is None:
        return None
    seg = packed.segment_ids
    if seg.shape != (batch, seq):
        raise ValueError(
            f"packed_seq_params.segment_ids has shape {tuple(seg.shape)}, but the layer sees "
            f"{batch} rows of {seq} tokens"
        )
    return torch.where(seg < 0, seg.max() + 1, seg)


class MambaMixer(torch.nn.Module):
    """The Mamba-2 mixer; ``forward(x [s, b, h]) -> [s, b, h]`` (see the module docstring)."""

    def __init__(self, ctx: ModelContext, *, layer_number: int) -> None:
        super().__init__()
        cfg, ps, ssm = ctx.config, ctx.parallel_state, ssm_section(ctx)
        refuse_context_parallel(ctx, "Mamba (M)")
        self.layer_number = layer_number
        heads, groups = ssm.mamba_heads(cfg.hidden_size), ssm.mamba_num_groups
        if heads % groups:
            raise ValueError(f"Mamba: {heads} heads do not split over {groups} groups")
        check_tp_divisible(ctx, mamba_num_heads=heads, mamba_num_groups=groups)
        tp = ps.tp_size
        self.tp_rank, self.tp_size = ps.tp_rank, tp
        self.head_dim, self.state_dim = ssm.mamba_head_dim, ssm.mamba_state_dim
        self.local_heads, self.local_groups = heads // tp, groups // tp
        self.d_inner = heads * self.head_dim
        self.local_inner = self.local_heads * self.head_dim
        gn = groups * self.state_dim
        self.local_gn = self.local_groups * self.state_dim
        self.chunk_size = ssm.mamba_chunk_size
        self.dt_limit = (ssm.mamba_dt_limit_min, ssm.mamba_dt_limit_max)
        self.kernel = ssm.ssm_kernel
        self.in_proj = ColumnParallelLinear(
            cfg.hidden_size,
            2 * self.d_inner + 2 * gn + heads,
            tp_group=ctx.tp_group,
            bias=ssm.mamba_proj_bias,
            partitions=[self.d_inner, self.d_inner, gn, gn, heads],
            sequence_parallel=ctx.sequence_parallel,
            init_method=ctx.init_method(),
        )
        k = ssm.mamba_conv_kernel
        self.conv_channels = [self.local_inner, self.local_gn, self.local_gn]
        conv_dim = sum(self.conv_channels)
        self.conv1d = torch.nn.Conv1d(
            conv_dim, conv_dim, k, groups=conv_dim, bias=ssm.mamba_conv_bias, padding=k - 1
        )
        bound = 1.0 / math.sqrt(k)
        init_tensor(self.conv1d.weight, uniform(-bound, bound), self.shard_layout("conv1d.weight"))
        if self.conv1d.bias is not None:
            init_tensor(self.conv1d.bias, ZEROS, self.shard_layout("conv1d.bias"))
        self.dt_bias = torch.nn.Parameter(torch.empty(self.local_heads))
        init_tensor(
            self.dt_bias,
            dt_bias_init(ssm.mamba_dt_min, ssm.mamba_dt_max, ssm.mamba_dt_init_floor),
            self.shard_layout("dt_bias"),
        )
        self.A_log = torch.nn.Parameter(torch.empty(self.local_heads))
        init_tensor(self.A_log, a_log_init(), self.shard_layout("A_log"))
        self.D = torch.nn.Parameter(torch.empty(self.local_heads))
        init_tensor(self.D, ONES, self.shard_layout("D"))
        self.norm = GroupedGatedRMSNorm(self.local_inner, self.d_inner // groups, cfg.norm_epsilon)
        init_tensor(self.norm.weight, ONES, self.shard_layout("norm.weight"))
        self.out_proj = RowParallelLinear(
            self.d_inner,
            cfg.hidden_size,
            tp_group=ctx.tp_group,
            bias=ssm.mamba_proj_bias,
            input_is_parallel=True,
            sequence_parallel=ctx.sequence_parallel,
            init_method=ctx.output_init_method(),
        )
        if tp > 1:
            mark_tensor_parallel(
                *self.conv1d.parameters(), self.dt_bias, self.A_log, self.D, self.norm.weight
            )

    def shard_layout(self, name: str) -> Layout | None:
        """Where this rank's share of the conv, ``dt_bias``, ``A_log``, ``D`` and norm weight
        sits in the full tensors: heads (and groups) split over TP."""
        split = (self.tp_rank, self.tp_size, None)
        if name in ("conv1d.weight", "conv1d.bias"):
            shape = (sum(self.conv_channels), 1, self.conv1d.kernel_size[0])
            if name == "conv1d.bias":
                shape = shape[:1]
            return Layout.split(shape, {0: (self.tp_rank, self.tp_size, self.conv_channels)})
        sizes = {
            "dt_bias": self.local_heads,
            "A_log": self.local_heads,
            "D": self.local_heads,
            "norm.weight": self.local_inner,
        }
        if name in sizes:
            return Layout.split((sizes[name],), {0: split})
        return None

    def recurrent_state_spec(self) -> RecurrentStateSpec:
        """Per request: the conv state (last k - 1 inputs of x, B, C) and the SSM state."""
        k = self.conv1d.kernel_size[0]
        return RecurrentStateSpec(
            shapes=(
                (sum(self.conv_channels), k - 1),
                (self.local_heads, self.head_dim, self.state_dim),
            ),
            float32=(False, True),
        )

    def _split(self, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z, xbc, dt = projected.split(
            [self.local_inner, sum(self.conv_channels), self.local_heads], dim=-1
        )
        return z, xbc, dt

    def _time_step(self, dt: torch.Tensor) -> torch.Tensor:
        dt = F.softplus(dt.float() + self.dt_bias.float())
        return dt.clamp(min=self.dt_limit[0], max=self.dt_limit[1])

    def _conv_weight(self) -> torch.Tensor:
        return self.conv1d.weight.squeeze(1)

    def forward(
        self,
        x: torch.Tensor,
        *,
        paged: PagedBatch | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if paged is not None:
            return self._forward_paged(x, paged)
        projected = self.in_proj(x).transpose(0, 1)  # [b, s, local]
        b, s, _ = projected.shape
        z, xbc, dt = self._split(projected)
        seq_idx = sequence_ids(packed_seq_params, b, s)
        xbc = causal_conv1d(xbc, self._conv_weight(), self.conv1d.bias, seq_idx=seq_idx)
        xs, B, C = xbc.split(self.conv_channels, dim=-1)
        scan, _ = scan_functions(self.kernel, "mamba")
        y = scan(
            xs.unflatten(-1, (self.local_heads, self.head_dim)),
            self._time_step(dt),
            -torch.exp(self.A_log.float()),
            B.unflatten(-1, (self.local_groups, self.state_dim)),
            C.unflatten(-1, (self.local_groups, self.state_dim)),
            chunk_size=self.chunk_size,
            D=self.D,
            seq_idx=seq_idx,
        )
        y = self.norm(y.flatten(-2), z)
        return self.out_proj(y.transpose(0, 1))

    def _forward_paged(self, x: torch.Tensor, paged: PagedBatch) -> torch.Tensor:
        """The engine's flat token row ``[T, 1, h]``: decode steps, then prefill chunks."""
        projected = self.in_proj(x)[:, 0]  # [T, local]
        num_tokens = projected.shape[0]
        conv_states, ssm_states = paged.layer_states(self.layer_number)
        out = projected.new_zeros(num_tokens + 1, self.local_inner)  # last row: padding sink
        A = -torch.exp(self.A_log.float())
        scan, step = scan_functions(self.kernel, "mamba")
        nd = paged.num_decode
        if nd:
            slots = paged.decode_state_slots
            assert slots is not None  # a batch over recurrent state carries its slots
            z, xbc, dt = self._split(projected[:nd])
            conv = conv_states.index_select(0, slots)
            state = ssm_states.index_select(0, slots)
            xbc = causal_conv1d_step(xbc, conv, self._conv_weight(), self.conv1d.bias)
            xs, B, C = xbc.split(self.conv_channels, dim=-1)
            y = step(
                state,
                xs.unflatten(-1, (self.local_heads, self.head_dim)),
                self._time_step(dt),
                A,
                B.unflatten(-1, (self.local_groups, self.state_dim)),
                C.unflatten(-1, (self.local_groups, self.state_dim)),
                self.D,
            )
            conv_states.index_copy_(0, slots, conv)
            ssm_states.index_copy_(0, slots, state)
            out[:nd] = self.norm(y.flatten(-2), z)
        if paged.num_prefill:
            rows, valid = paged.prefill_query_rows, paged.prefill_rows_valid()
            slots = paged.prefill_state_slots
            assert slots is not None  # a batch over recurrent state carries its slots
            padded = torch.cat([projected, projected.new_zeros(1, projected.shape[1])])[rows]
            z, xbc, dt = self._split(padded)  # [P, Q, *]
            xbc, conv_final = causal_conv1d(
                xbc,
                self._conv_weight(),
                self.conv1d.bias,
                initial_state=conv_states.index_select(0, slots),
                lengths=valid.sum(1),
                return_final_state=True,
            )
            xs, B, C = xbc.split(self.conv_channels, dim=-1)
            y, final = scan(
                xs.unflatten(-1, (self.local_heads, self.head_dim)),
                self._time_step(dt) * valid.unsqueeze(-1),  # dt = 0 on padding: state unchanged
                A,
                B.unflatten(-1, (self.local_groups, self.state_dim)),
                C.unflatten(-1, (self.local_groups, self.state_dim)),
                chunk_size=self.chunk_size,
                D=self.D,
                initial_state=ssm_states.index_select(0, slots),
                return_final_state=True,
            )
            conv_states.index_copy_(0, slots, conv_final.to(conv_states.dtype))
            ssm_states.index_copy_(0, slots, final)
            y = self.norm(y.flatten(-2), z)
            out.index_copy_(0, rows.reshape(-1), y.reshape(-1, y.shape[-1]))
        return self.out_proj(out[:num_tokens].unsqueeze(1))


def mamba_layer_spec(config) -> object:
    """The ``M`` symbol: a Mamba-2 mixer layer (no MLP)."""
    from mcore.models.layer import LayerSpec

    return LayerSpec(attention=None, mlp=None, mixer="mamba")
