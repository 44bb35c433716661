"""The model side of paged-KV-cache inference: the batch a forward reads and paged attention.

An inference engine (mcore-inference) owns the cache memory and the scheduling; it hands
``GPTModel.forward_paged`` a :class:`PagedBatch`: one flat row of tokens that mixes prefill
chunks of some requests with single decode tokens of others, where each token's key/value goes
in the cache (``slot_mapping``) and, per request, which cache blocks hold its context. Each
attention layer writes its new keys/values into the cache and attends over the blocks.

Layout of the flat token row: the decode requests' tokens come first, one each (rows
``[0, num_decode)``), then the prefill chunks. Every tensor's shape depends only on the ints
``num_tokens``, ``num_decode``, ``num_prefill``, the padded query length and the block-table
width, so a CUDA graph captured for one set of those replays for any batch padded to them.
Padding tokens write to slot 0 of block 0, which the engine reserves as a scratch block and
never hands to a request.

Cache layout per attention layer (see :class:`KVCacheSpec`): grouped-query attention keeps keys
and values, ``[num_blocks, block_size, kv_heads, head_dim]`` each; multi-latent attention keeps
one tensor ``[num_blocks, block_size, 1, kv_lora_rank + rope_dim]`` holding the normalised
compressed latent and the rotated rope key (the latent doubles as the value), which is what
makes MLA's cache small.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "KVCacheSpec",
    "PagedBatch",
    "RecurrentStateSpec",
    "paged_attention",
    "prepare_for_inference",
]

_MISSING = object()


@dataclass(frozen=True)
class KVCacheSpec:
    """What one attention layer keeps per token in the paged cache (this TP rank's share)."""

    heads: int
    """Key/value heads stored (1 for multi-latent attention)."""
    key_dim: int
    """Per-head key width."""
    value_dim: int
    """Per-head value width."""
    values_in_keys: bool = False
    """Values are the first ``value_dim`` channels of the keys (MLA's latent): one tensor."""

    @property
    def num_tensors(self) -> int:
        return 1 if self.values_in_keys else 2

    def shapes(self, num_blocks: int, block_size: int) -> list[tuple[int, ...]]:
        """Shapes of this layer's cache tensors for ``num_blocks`` blocks of ``block_size``."""
        keys = (num_blocks, block_size, self.heads, self.key_dim)
        if self.values_in_keys:
            return [keys]
        return [keys, (num_blocks, block_size, self.heads, self.value_dim)]

    def elements_per_token(self) -> int:
        """Cache elements one token costs in this layer."""
        per_head = self.key_dim + (0 if self.values_in_keys else self.value_dim)
        return self.heads * per_head


@dataclass(frozen=True)
class RecurrentStateSpec:
    """What one sequence-mixer layer (Mamba-2, gated delta net) keeps per request at inference,
    this TP rank's share: a fixed-size state, however long the request, in one *slot* of the
    engine's state tensors ``[num_slots, *shape]``."""

    shapes: tuple[tuple[int, ...], ...]
    """Per-request shape of each state tensor (e.g. the conv state ``[channels, k - 1]`` and the
    SSM state ``[heads, head_dim, state_dim]``)."""
    float32: tuple[bool, ...]
    """Whether each tensor is kept in fp32 whatever the model dtype (recurrent states are:
    they accumulate over the whole request)."""

    def elements_per_request(self) -> int:
        """State elements one request costs in this layer."""
        total = 0
        for shape in self.shapes:
            n = 1
            for d in shape:
                n *= d
            total += n
        return total


@dataclass
class PagedBatch:
    """One engine step's tokens and where their keys/values live in the paged cache.

    Built by the inference engine; read by ``GPTModel.forward_paged`` and the attention
    modules. All tensors are on the model's device.
    """

    input_ids: torch.Tensor
    """``[T]`` token ids (decode tokens first, then prefill chunks, then padding)."""
    positions: torch.Tensor
    """``[T]`` position of each token in its sequence."""
    slot_mapping: torch.Tensor
    """``[T]`` int64 ``block * block_size + offset`` where each token's key/value is written."""
    block_size: int
    num_decode: int
    """Requests with exactly one token this step (rows ``[0, num_decode)``)."""
    decode_block_tables: torch.Tensor
    """``[num_decode, blocks]`` the cache blocks of each decode request (padding: block 0)."""
    decode_context_lens: torch.Tensor
    """``[num_decode]`` tokens of context each decode token attends to (itself included)."""
    num_prefill: int
    """Requests with a chunk of several tokens this step."""
    prefill_block_tables: torch.Tensor
    """``[num_prefill, blocks]`` the cache blocks of each prefill request."""
    prefill_query_rows: torch.Tensor
    """``[num_prefill, max_query]`` the row of each chunk token in the flat batch; padding
    entries hold ``T`` (a scratch row that is dropped)."""
    prefill_query_positions: torch.Tensor
    """``[num_prefill, max_query]`` positions of the chunk tokens: a token attends to the keys
    at positions ``<=`` its own (padding entries hold 0)."""
    logits_rows: torch.Tensor
    """``[R]`` rows whose logits the forward returns, in this order."""
    decode_runs: tuple[tuple[torch.Tensor, int], ...] = ()
    """``(rows, blocks)``: decode rows (an index tensor) that attend over only their first
    ``blocks`` block-table columns, so a batch of mixed lengths gathers less padding; the runs
    cover every decode row once. Empty: one run, all decode rows over the whole table."""
    caches: Mapping[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    """This rank's cache tensors by layer number (see :class:`KVCacheSpec`)."""
    decode_state_slots: torch.Tensor | None = None
    """``[num_decode]`` the recurrent-state slot of each decode request (padding: slot 0, a
    scratch slot the engine never hands out). Only for models with sequence mixers."""
    prefill_state_slots: torch.Tensor | None = None
    """``[num_prefill]`` the recurrent-state slot of each prefill request. A request's slot
    holds zeros before its first chunk and its state after each later one."""
    states: Mapping[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    """This rank's recurrent-state tensors ``[num_slots, *shape]`` by layer number (see
    :class:`RecurrentStateSpec`)."""
    _per_forward: dict = field(default_factory=dict, repr=False, compare=False)

    def begin_forward(self) -> None:
        """Forget the attention masks (and other :meth:`memo` values) of a previous forward.
        Every layer of one forward shares them; a CUDA graph must compute them inside the
        forward it captures."""
        self._per_forward.clear()

    def memo(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """``make()``, computed once per forward under ``key`` and shared by every layer (the
        rotary tables in the layout a layer wants, say)."""
        value = self._per_forward.get(key, _MISSING)
        if value is _MISSING:
            value = self._per_forward[key] = make()
        return value

    def attention_mask(
        self,
        kind: str,
        keys: int,
        group: int,
        dtype: torch.dtype,
        run: int | None = None,
    ) -> torch.Tensor:
        """The additive mask (0 or -inf) of the ``decode`` or ``prefill`` queries over their
        gathered ``keys``, its query rows repeated for the ``group`` heads folded into them:
        ``[n, 1, group * queries, keys]``; ``run``: only the rows of that decode run."""
        key = (kind, keys, group, dtype, run)
        mask = self._per_forward.get(key)
        if mask is None:
            positions = torch.arange(keys, device=self.positions.device)
            if kind == "decode":
                lens = self.decode_context_lens
                if run is not None:
                    lens = lens.index_select(0, self.decode_runs[run][0])
                visible = (positions < lens[:, None]).unsqueeze(1)
            else:
                visible = positions <= self.prefill_query_positions[..., None]
            n, queries = visible.shape[0], visible.shape[1]
            visible = visible[:, None, None].expand(n, 1, group, queries, keys)
            zero = torch.zeros((), dtype=dtype, device=visible.device)
            mask = torch.where(visible, zero, float("-inf"))  # one pass, written once
            mask = self._per_forward[key] = mask.view(n, 1, group * queries, keys)
        return mask

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    def layer_cache(self, layer_number: int) -> tuple[torch.Tensor, ...]:
        try:
            return self.caches[layer_number]
        except KeyError:
            raise KeyError(
                f"the paged batch holds no KV cache for layer {layer_number}; the engine "
                "allocates one per layer listed by model.kv_cache_specs()"
            ) from None

    def layer_states(self, layer_number: int) -> tuple[torch.Tensor, ...]:
        try:
            return self.states[layer_number]
        except KeyError:
            raise KeyError(
                f"the paged batch holds no recurrent state for layer {layer_number}; the engine "
                "allocates one per layer listed by model.recurrent_state_specs()"
            ) from None

    def prefill_rows_valid(self) -> torch.Tensor:
        """``[num_prefill, max_query]`` True where ``prefill_query_rows`` is a real token (the
        chunks are right-padded with the scratch row ``T``)."""
        return self.prefill_query_rows < self.num_tokens

    def write(self, cache: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``values`` ``[T, heads, dim]`` at the batch's slots of ``cache``."""
        flat = cache.view(-1, *cache.shape[2:])
        flat.index_copy_(0, self.slot_mapping, values.to(cache.dtype))

    def attend(
        self,
        layer_number: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        softmax_scale: float,
    ) -> torch.Tensor:
        """Grouped-query attention of ``q`` over the cache after storing ``k``, ``v``.

        Token-first, as the flat batch is: ``q [T, hq, d]``, ``k, v [T, hkv, d]`` (views of
        the fused projection are fine) -> ``[T, hq, dv]``.
        """
        key_cache, value_cache = self.layer_cache(layer_number)
        self.write(key_cache, k)
        self.write(value_cache, v)
        return paged_attention(q, key_cache, value_cache, self, softmax_scale)

    def attend_latent(
        self,
        layer_number: int,
        q: torch.Tensor,
        entry: torch.Tensor,
        value_dim: int,
        softmax_scale: float,
    ) -> torch.Tensor:
        """Attention over one shared latent head (MLA with absorbed up-projections).

        ``q [T, heads, r + rope]``, ``entry [T, 1, r + rope]`` (latent and rope key of the new
        tokens) -> ``[T, heads, value_dim]``: the attention-weighted latents.
        """
        (cache,) = self.layer_cache(layer_number)
        self.write(cache, entry)
        return paged_attention(q, cache, None, self, softmax_scale, value_dim=value_dim)


def _gather(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """``[n, heads, blocks * block_size, dim]``: the context of each row of ``block_tables``."""
    n, blocks = block_tables.shape
    # index_select copies whole blocks at memory speed; advanced indexing is several times
    # slower on CPU.
    gathered = cache.index_select(0, block_tables.reshape(-1))  # [n * blocks, block_size, ...]
    return gathered.view(n, blocks * cache.shape[1], *cache.shape[2:]).transpose(1, 2)


def _grouped_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: PagedBatch,
    kind: str,
    scale: float,
    run: int | None = None,
) -> torch.Tensor:
    """``q [n, hq, Q, d]`` over ``k [n, hkv, L, d]``, ``v [n, hkv, L, dv]`` -> ``[n, hq, Q,
    dv]``, masked as the batch's ``kind`` (decode or prefill) queries see their context
    (``run``: those of one of the batch's decode runs).

    The query heads that share a key/value head are folded into the query dimension, so the
    keys and values are never repeated per head.
    """
    n, hq, nq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    q = q.reshape(n, hkv, group * nq, d)
    mask = batch.attention_mask(kind, k.shape[2], group, q.dtype, run)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.reshape(n, hq, nq, out.shape[-1])


def _decode_attention(
    q: torch.Tensor,
    batch: PagedBatch,
    keys_values: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    softmax_scale: float,
    dv: int,
) -> torch.Tensor:
    """The decode rows' attention, ``q [num_decode, hq, d]`` -> ``[num_decode, hq, dv]``: all
    at once over the whole block table, or run by run (``batch.decode_runs``)."""
    nd, heads = q.shape[0], q.shape[1]
    if not batch.decode_runs:
        keys, values = keys_values(batch.decode_block_tables)
        out = _grouped_sdpa(q.unsqueeze(2), keys, values, batch, "decode", softmax_scale)
        return out.view(nd, heads, dv)
    out = q.new_empty(nd, heads, dv)
    for run, (rows, blocks) in enumerate(batch.decode_runs):
        keys, values = keys_values(batch.decode_block_tables[:, :blocks].index_select(0, rows))
        part = _grouped_sdpa(
            q.index_select(0, rows).unsqueeze(2), keys, values, batch, "decode",
            softmax_scale, run,
        )  # fmt: skip
        out.index_copy_(0, rows, part.view(len(rows), heads, dv))
    return out


def paged_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor | None,
    batch: PagedBatch,
    softmax_scale: float,
    *,
    value_dim: int | None = None,
) -> torch.Tensor:
    """Causal attention of the batch's queries over their requests' cached context.

    ``q [T, hq, d]``; the caches ``[num_blocks, block_size, hkv, d]`` (``value_cache`` None:
    values are the first ``value_dim`` channels of the keys). Returns ``[T, hq, dv]``.

    Decode tokens attend over their request's first ``context_len`` cached tokens, a run of
    rows of similar length at a time (``batch.decode_runs``); prefill chunks, padded to one
    query length, over the keys at positions up to each query's own. Both gather the blocks
    (a copy of the context) and run masked SDPA: plain torch, correct on any device, in place
    of a fused paged kernel.
    """
    num_tokens, heads = q.shape[0], q.shape[1]
    dv = value_dim if value_cache is None else value_cache.shape[-1]
    if dv is None:
        raise ValueError("paged_attention: without a value_cache, give value_dim")

    def keys_values(tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = _gather(key_cache, tables)
        values = keys[..., :dv] if value_cache is None else _gather(value_cache, tables)
        return keys, values

    nd = batch.num_decode
    decoded = _decode_attention(q[:nd], batch, keys_values, softmax_scale, dv) if nd else None
    if nd == num_tokens and decoded is not None:
        return decoded  # a decode-only step: nothing else to place
    out = q.new_zeros(num_tokens + 1, heads, dv)  # the last row catches padded prefill queries
    if decoded is not None:
        out[:nd] = decoded
    if batch.num_prefill:
        keys, values = keys_values(batch.prefill_block_tables)
        rows = batch.prefill_query_rows  # [P, Q]; padding entries hold T
        # Padding queries read the last real one (their results land in the dropped row T).
        padded_q = q.index_select(0, rows.clamp(max=num_tokens - 1).view(-1))
        padded_q = padded_q.view(*rows.shape, *q.shape[1:])  # [P, Q, hq, d]
        chunks = _grouped_sdpa(
            padded_q.transpose(1, 2), keys, values, batch, "prefill", softmax_scale
        )
        out.index_copy_(0, rows.reshape(-1), chunks.transpose(1, 2).reshape(-1, heads, dv))
    return out[:num_tokens]


def prepare_for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """Evaluation mode, and every module with an inference switch told to use it.

    A module that behaves differently when serving defines ``set_inference_mode(enabled)``
    (mcore-moe's MoE layer: no capacity dropping, every token reaches its chosen experts).
    """
    model.eval()
    for module in model.modules():
        switch = getattr(module, "set_inference_mode", None)
        if callable(switch):
            switch(True)
    return model
