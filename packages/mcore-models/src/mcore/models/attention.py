"""Self-attention modules: grouped-query attention (MHA and GQA) and multi-latent attention.

Activations enter and leave sequence-first, ``[s, b, h]`` (``[s / tp, b, h]`` with sequence
parallelism); the core attention kernel sees ``[b, heads, s, head_dim]``. Heads are split over
tensor-parallel ranks: each rank projects, attends and outputs its own heads, and the output
projection's reduction sums them.

At inference (``paged=`` a :class:`~mcore.models.inference.PagedBatch`) the input is the
engine's flat token row ``[T, 1, h]``; keys and values go to the paged cache and attention runs
over each request's cached context. ``kv_cache_spec()`` tells the engine what to allocate.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from mcore.models.backends import resolve_backend
from mcore.models.context import ModelContext, mark_tp_partial_grad
from mcore.models.inference import KVCacheSpec, PagedBatch
from mcore.models.rope import apply_rotary, apply_rotary_rows, rotary_rows, yarn_mscale
from mcore.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
)
from mcore.parallel.init import init_tensor


def _heads_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[s, b, heads * d]`` -> ``[b, heads, s, d]``."""
    s, b, _ = x.shape
    return x.view(s, b, heads, -1).permute(1, 2, 0, 3)


def _sequence_first(x: torch.Tensor) -> torch.Tensor:
    """``[b, heads, s, d]`` -> ``[s, b, heads * d]``."""
    b, h, s, d = x.shape
    return x.permute(2, 0, 1, 3).reshape(s, b, h * d)


class _CoreAttention(torch.nn.Module):
    """The attention kernel, optionally recomputed in backward (selective recompute)."""

    def __init__(self, ctx: ModelContext) -> None:
        super().__init__()
        cfg = ctx.config
        self.kernel = resolve_backend(
            ctx.registries["attention_backend"],
            cfg.attention_backend,
            dropout=cfg.attention_dropout,
        )
        self.cp_group = ctx.parallel_state.cp_group
        self.recompute = cfg.recompute_granularity == "selective"

    def forward(self, q, k, v, softmax_scale: float, attn_mask=None) -> torch.Tensor:
        def run(q, k, v):
            extra = {} if attn_mask is None else {"attn_mask": attn_mask}
            return self.kernel(
                q,
                k,
                v,
                softmax_scale=softmax_scale,
                cp_group=self.cp_group,
                training=self.training,
                **extra,
            )

        if self.recompute and torch.is_grad_enabled():
            # The s x s attention scores are the largest activation and cheap to recompute.
            return checkpoint(run, q, k, v, use_reentrant=False)
        return run(q, k, v)


class SelfAttention(torch.nn.Module):
    """Multi-head or grouped-query attention with optional qkv bias, qk-norm and rotary."""

    def __init__(self, ctx: ModelContext, *, layer_number: int) -> None:
        super().__init__()
        cfg, ps = ctx.config, ctx.parallel_state
        ps.check_divisible(
            num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.query_groups
        )
        self.layer_number = layer_number
        self.head_dim = d = cfg.head_dim
        self.local_heads = cfg.num_attention_heads // ps.tp_size
        self.local_groups = cfg.query_groups // ps.tp_size
        q_size, kv_size = cfg.num_attention_heads * d, cfg.query_groups * d
        # With an output gate the query block holds, per head, the query then its gate.
        self.output_gate = cfg.attention_output_gate
        q_block = 2 * q_size if self.output_gate else q_size
        self.linear_qkv = ColumnParallelLinear(
            cfg.hidden_size,
            q_block + 2 * kv_size,
            tp_group=ctx.tp_group,
            bias=cfg.add_qkv_bias,
            partitions=[q_block, kv_size, kv_size],
            sequence_parallel=ctx.sequence_parallel,
            init_method=ctx.init_method(),
        )
        self.q_layernorm = ctx.norm(d) if cfg.qk_layernorm else None
        self.k_layernorm = ctx.norm(d) if cfg.qk_layernorm else None
        if self.q_layernorm is not None and self.k_layernorm is not None and ps.tp_size > 1:
            # Shared over heads, but each TP rank only normalises its own heads.
            mark_tp_partial_grad(*self.q_layernorm.parameters(), *self.k_layernorm.parameters())
        self.core_attention = _CoreAttention(ctx)
        self.linear_proj = RowParallelLinear(
            q_size,
            cfg.hidden_size,
            tp_group=ctx.tp_group,
            bias=cfg.add_bias_linear,
            input_is_parallel=True,
            sequence_parallel=ctx.sequence_parallel,
            init_method=ctx.output_init_method(),
        )
        self.softmax_scale = 1.0 / math.sqrt(d)

    def kv_cache_spec(self) -> KVCacheSpec:
        """Keys and values of this rank's key/value heads."""
        return KVCacheSpec(heads=self.local_groups, key_dim=self.head_dim, value_dim=self.head_dim)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        paged: PagedBatch | None = None,
        attn_mask: torch.Tensor | None = None,
    ):
        if paged is not None:
            return self._forward_paged(x, rotary, paged)
        qkv = self.linear_qkv(x)
        d = self.head_dim
        q_block = self.local_heads * d * (2 if self.output_gate else 1)
        q, k, v = qkv.split([q_block, self.local_groups * d, self.local_groups * d], dim=-1)
        gate = None
        if self.output_gate:
            q, gate = q.unflatten(-1, (self.local_heads, 2 * d)).split([d, d], dim=-1)
            q, gate = q.flatten(-2), gate.flatten(-2)
        q, k, v = (
            _heads_first(t, n)
            for t, n in ((q, self.local_heads), (k, self.local_groups), (v, self.local_groups))
        )
        if self.q_layernorm is not None and self.k_layernorm is not None:  # both, or neither
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        out = self.core_attention(q, k, v, self.softmax_scale, attn_mask)
        out = _sequence_first(out)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return self.linear_proj(out)

    def _forward_paged(
        self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None, paged: PagedBatch
    ) -> torch.Tensor:
        """The same over the engine's flat token row ``[T, 1, h]``, kept token-first
        (``[T, heads, d]``) from the projection to the cache and back, with queries and keys
        rotated in one pass when they sit side by side."""
        tokens, d = x.shape[0], self.head_dim
        hq, hkv = self.local_heads, self.local_groups
        heads = self.linear_qkv(x).view(tokens, -1, d)  # [T, (2)hq + 2hkv, d]
        gate = None
        if self.output_gate:
            q_gate, k, v = heads.split([2 * hq, hkv, hkv], dim=1)
            q, gate = q_gate.unflatten(1, (hq, 2)).unbind(2)
        else:
            q, k, v = heads.split([hq, hkv, hkv], dim=1)
        if self.q_layernorm is not None and self.k_layernorm is not None:  # both, or neither
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        if rotary is not None:
            tables = paged.memo(("rotary", id(rotary[0])), lambda: rotary_rows(*rotary))
            if gate is None and self.q_layernorm is None:
                q, k = apply_rotary_rows(heads[:, : hq + hkv], *tables).split([hq, hkv], dim=1)
            else:
                q, k = apply_rotary_rows(q, *tables), apply_rotary_rows(k, *tables)
        out = paged.attend(self.layer_number, q, k, v, self.softmax_scale)  # [T, hq, d]
        out = out.reshape(tokens, 1, hq * d)
        if gate is not None:
            out = out * torch.sigmoid(gate.reshape(tokens, 1, hq * d))
        return self.linear_proj(out)


class MLASelfAttention(torch.nn.Module):
    """DeepSeek-style multi-latent attention.

    Queries (optionally through a low-rank bottleneck) and keys/values (always through a
    compressed latent of rank ``kv_lora_rank``) are projected per head; rope is applied to a
    separate ``qk_pos_emb_head_dim`` slice, with one rope key shared by all heads. The
    down-projections are replicated over TP ranks; the up-projections split heads.
    """

    def __init__(self, ctx: ModelContext, *, layer_number: int) -> None:
        super().__init__()
        cfg, ps = ctx.config, ctx.parallel_state
        ps.check_divisible(num_attention_heads=cfg.num_attention_heads)
        self.layer_number = layer_number
        self.local_heads = cfg.num_attention_heads // ps.tp_size
        self.qk_head_dim, self.rope_dim, self.v_head_dim = (
            cfg.qk_head_dim,
            cfg.qk_pos_emb_head_dim,
            cfg.v_head_dim,
        )
        self.kv_lora_rank = cfg.kv_lora_rank
        heads = cfg.num_attention_heads
        q_head = cfg.qk_head_dim + cfg.qk_pos_emb_head_dim
        column = dict(
            tp_group=ctx.tp_group,
            bias=False,
            sequence_parallel=ctx.sequence_parallel,
            init_method=ctx.init_method(),
        )
        replicated: list[torch.nn.Parameter] = []
        if cfg.q_lora_rank is None:
            self.linear_q_down_proj = self.q_layernorm = None
            self.linear_q_proj = ColumnParallelLinear(cfg.hidden_size, heads * q_head, **column)
        else:
            self.linear_q_down_proj = self._replicated_linear(ctx, cfg.q_lora_rank)
            self.q_layernorm = ctx.norm(cfg.q_lora_rank)
            self.linear_q_proj = ColumnParallelLinear(
                cfg.q_lora_rank, heads * q_head, **{**column, "sequence_parallel": False}
            )
            replicated += [*self.linear_q_down_proj.parameters(), *self.q_layernorm.parameters()]
        self.linear_kv_down_proj = self._replicated_linear(
            ctx, cfg.kv_lora_rank + cfg.qk_pos_emb_head_dim
        )
        self.kv_layernorm = ctx.norm(cfg.kv_lora_rank)
        self.linear_kv_up_proj = ColumnParallelLinear(
            cfg.kv_lora_rank,
            heads * (cfg.qk_head_dim + cfg.v_head_dim),
            **{**column, "sequence_parallel": False},
        )
        replicated += [*self.linear_kv_down_proj.parameters(), *self.kv_layernorm.parameters()]
        self.sequence_parallel = ctx.sequence_parallel
        self.tp_group = ctx.tp_group
        if ctx.sequence_parallel:
            # Down-projections see only this rank's sequence shard: their gradients are partial.
            mark_tp_partial_grad(*replicated)
        self.core_attention = _CoreAttention(ctx)
        self.linear_proj = RowParallelLinear(
            heads * cfg.v_head_dim,
            cfg.hidden_size,
            tp_group=ctx.tp_group,
            bias=cfg.add_bias_linear,
            input_is_parallel=True,
            sequence_parallel=ctx.sequence_parallel,
            init_method=ctx.output_init_method(),
        )
        scale = 1.0 / math.sqrt(q_head)
        if cfg.rope_scaling == "yarn" and cfg.yarn_mscale_all_dim:
            scale *= yarn_mscale(cfg.rope_scaling_factor, cfg.yarn_mscale_all_dim) ** 2
        self.softmax_scale = scale

    @staticmethod
    def _replicated_linear(ctx: ModelContext, out_features: int) -> torch.nn.Linear:
        layer = torch.nn.Linear(ctx.config.hidden_size, out_features, bias=False)
        init_tensor(layer.weight, ctx.init_method())
        return layer

    def _gather_sequence(self, x: torch.Tensor, *, grad_is_partial: bool) -> torch.Tensor:
        # Feeding a column-parallel layer, whose input mapping already sums the gradient over
        # TP, the backward only needs to split it; feeding per-rank heads directly, it must sum.
        return gather_from_sequence_parallel_region(
            x, self.tp_group, tensor_parallel_output_grad=grad_is_partial
        )

    def kv_cache_spec(self) -> KVCacheSpec:
        """One shared head per token: the compressed latent and the rope key (not full K/V)."""
        width = self.kv_lora_rank + self.rope_dim
        return KVCacheSpec(heads=1, key_dim=width, value_dim=self.kv_lora_rank, values_in_keys=True)

    def _project_q(self, x: torch.Tensor) -> torch.Tensor:
        if self.linear_q_down_proj is None or self.q_layernorm is None:  # both, or neither
            return self.linear_q_proj(x)
        latent_q = self.q_layernorm(self.linear_q_down_proj(x))
        if self.sequence_parallel:
            latent_q = self._gather_sequence(latent_q, grad_is_partial=False)
        return self.linear_q_proj(latent_q)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        paged: PagedBatch | None = None,
        attn_mask: torch.Tensor | None = None,
    ):
        if paged is not None:
            return self._forward_paged(x, rotary, paged)
        q = self._project_q(x)
        latent_kv, k_rope = self.linear_kv_down_proj(x).split(
            [self.kv_lora_rank, self.rope_dim], dim=-1
        )
        latent_kv = self.kv_layernorm(latent_kv)
        if self.sequence_parallel:
            latent_kv = self._gather_sequence(latent_kv, grad_is_partial=False)
            k_rope = self._gather_sequence(k_rope, grad_is_partial=True)
        else:
            # Every rank's heads use the one rope key: sum its gradient over TP in backward.
            k_rope = copy_to_tensor_parallel_region(k_rope, self.tp_group)
        kv = self.linear_kv_up_proj(latent_kv)

        q = _heads_first(q, self.local_heads)
        q_nope, q_rope = q.split([self.qk_head_dim, self.rope_dim], dim=-1)
        kv = _heads_first(kv, self.local_heads)
        k_nope, v = kv.split([self.qk_head_dim, self.v_head_dim], dim=-1)
        k_rope = _heads_first(k_rope, 1)
        if rotary is not None:
            q_rope, k_rope = apply_rotary(q_rope, *rotary), apply_rotary(k_rope, *rotary)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, self.local_heads, -1, -1)], dim=-1)
        out = self.core_attention(q, k, v, self.softmax_scale, attn_mask)
        return self.linear_proj(_sequence_first(out))

    def _forward_paged(
        self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None, paged: PagedBatch
    ) -> torch.Tensor:
        """Attention in the latent space, over a cache of latents and rope keys.

        The key up-projection is absorbed into the queries (``q_nope . (W_uk c) = (W_uk^T
        q_nope) . c``) and the value up-projection applied after attention to the weighted
        latents, so the cached context is never expanded to per-head keys and values.
        """
        q = _heads_first(self._project_q(x), self.local_heads)[0].transpose(0, 1)  # [T, h, *]
        q_nope, q_rope = q.split([self.qk_head_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.linear_kv_down_proj(x).split([self.kv_lora_rank, self.rope_dim], -1)
        latent = self.kv_layernorm(latent)[:, 0]  # [T, r]
        k_rope = _heads_first(k_rope, 1)  # [1, 1, T, rope]
        if rotary is not None:
            q_rope = apply_rotary(q_rope.transpose(0, 1)[None], *rotary)[0].transpose(0, 1)
            k_rope = apply_rotary(k_rope, *rotary)
        up = self.linear_kv_up_proj.weight.view(
            self.local_heads, self.qk_head_dim + self.v_head_dim, self.kv_lora_rank
        )
        w_uk, w_uv = up.split([self.qk_head_dim, self.v_head_dim], dim=1)
        q_latent = torch.einsum("thd,hdr->thr", q_nope, w_uk)
        entry = torch.cat([latent, k_rope[0, 0].to(latent.dtype)], dim=-1).unsqueeze(1)
        weighted = paged.attend_latent(
            self.layer_number,
            torch.cat([q_latent, q_rope.to(q_latent.dtype)], dim=-1),
            entry,
            self.kv_lora_rank,
            self.softmax_scale,
        )  # [T, h, r]
        out = torch.einsum("thr,hvr->thv", weighted, w_uv)
        return self.linear_proj(out.reshape(out.shape[0], 1, -1))
