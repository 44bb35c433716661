"""``GPTModel``: embedding, a stack of transformer layers, final norm and output projection.

``model(input_ids)`` returns logits ``[b, s, vocab]``; ``model(input_ids, labels=labels)``
returns the per-token loss ``[b, s]`` computed on the vocab-parallel logits without gathering
them. Under context parallelism, ``input_ids``, ``labels`` and ``position_ids`` are this rank's
load-balanced shard (``mcore.parallel.split_for_context_parallel``) and positions default to the
shard's global positions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from mcore.models.config import TransformerConfig
from mcore.models.context import ModelContext
from mcore.models.layer import LayerSpec, TransformerLayer, gpt_layer_spec
from mcore.models.rope import RotaryEmbedding
from mcore.parallel import (
    ColumnParallelLinear,
    ParallelState,
    VocabParallelEmbedding,
    cp_local_positions,
    gather_from_tensor_parallel_region,
    mark_tp_partial_grad,
    reduce_tp_partial_grads,
    scatter_to_sequence_parallel_region,
    vocab_parallel_cross_entropy,
)


class GPTModel(torch.nn.Module):
    """A decoder-only transformer language model, tensor/sequence/context parallel."""

    def __init__(
        self,
        config: TransformerConfig,
        parallel_state: ParallelState | None = None,
        *,
        sequence_parallel: bool = False,
        spec: LayerSpec | None = None,
        registries: Any = None,
    ) -> None:
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("TransformerConfig.vocab_size must be set to build a GPTModel")
        config.checked()
        ps = parallel_state or ParallelState()
        ps.check_divisible(vocab_size=config.vocab_size)
        ctx = ModelContext(config, ps, sequence_parallel, registries)
        self.config, self.parallel_state = config, ps
        self.sequence_parallel = ctx.sequence_parallel
        self.embedding = VocabParallelEmbedding(
            config.vocab_size,
            config.hidden_size,
            tp_group=ps.tp_group,
            init_method=ctx.init_method(),
            sequence_parallel=ctx.sequence_parallel,
        )
        self.position_embeddings = None
        if config.position_embedding_type == "learned_absolute":
            self.position_embeddings = torch.nn.Embedding(
                config.max_position_embeddings, config.hidden_size
            )
            ctx.init_method()(self.position_embeddings.weight.data)
        self.rotary = None
        if config.position_embedding_type == "rope":
            rope_dim = (
                config.qk_pos_emb_head_dim if config.multi_latent_attention else config.head_dim
            )
            self.rotary = RotaryEmbedding(rope_dim, config)
        spec = spec or gpt_layer_spec(config)
        # A dict with stable names: a pipeline stage keeps layer "17" called "17".
        self.layers = torch.nn.ModuleDict(
            {str(i): TransformerLayer(ctx, spec, layer_number=i) for i in range(config.num_layers)}
        )
        self.final_layernorm = ctx.norm(config.hidden_size)
        if ctx.sequence_parallel:
            mark_tp_partial_grad(*self.final_layernorm.parameters())
        self.output_layer = ColumnParallelLinear(
            config.hidden_size,
            config.vocab_size,
            tp_group=ps.tp_group,
            bias=False,
            gather_output=False,
            sequence_parallel=ctx.sequence_parallel,
            init_method=ctx.init_method(),
            skip_weight_param_allocation=not config.untie_embeddings_and_output_weights,
        )
        self.recompute_layers = config.recompute_granularity == "full"

    @property
    def tied_embeddings(self) -> bool:
        return not self.config.untie_embeddings_and_output_weights

    def default_positions(self, batch: int, seq: int, device: torch.device) -> torch.Tensor:
        """Positions of this rank's tokens: 0..s-1, or the CP shard's global positions."""
        ps = self.parallel_state
        if ps.cp_size > 1:
            pos = cp_local_positions(seq * ps.cp_size, ps.cp_size, ps.cp_rank).to(device)
        else:
            pos = torch.arange(seq, device=device)
        return pos.unsqueeze(0).expand(batch, seq)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = self.default_positions(b, s, input_ids.device)
        x = self.embedding(input_ids.t())  # [s, b, h], or [s / tp, b, h] with SP
        if self.position_embeddings is not None:
            pos = self.position_embeddings(position_ids.t())
            if self.sequence_parallel:
                pos = scatter_to_sequence_parallel_region(pos, self.parallel_state.tp_group)
            x = x + pos
        rotary = self.rotary(position_ids) if self.rotary is not None else None
        for layer in self.layers.values():
            if self.recompute_layers and torch.is_grad_enabled():
                x = checkpoint(layer, x, rotary, use_reentrant=False)
            else:
                x = layer(x, rotary)
        x = self.final_layernorm(x)
        weight = self.embedding.weight if self.tied_embeddings else None
        logits = self.output_layer(x, weight=weight)  # [s, b, vocab / tp]
        if labels is None:
            logits = gather_from_tensor_parallel_region(logits, self.parallel_state.tp_group)
            return logits.transpose(0, 1).contiguous()
        loss = vocab_parallel_cross_entropy(
            logits, labels.t(), tp_group=self.parallel_state.tp_group
        )
        return loss.t().contiguous()

    def reduce_partial_grads(self) -> None:
        """Sum over TP the gradients of replicated parameters that each rank sees part of.

        Needed with sequence parallelism or qk-norm under TP; call after backward.
        """
        reduce_tp_partial_grads(self, self.parallel_state.tp_group)


def build_gpt_model(config: TransformerConfig, parallel_state: ParallelState | None = None, **kw):
    """The ``model`` registry entry ``gpt``."""
    return GPTModel(config, parallel_state, **kw)
