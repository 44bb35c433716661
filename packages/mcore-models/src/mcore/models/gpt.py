"""``GPTModel``: embedding, a stack of transformer layers, final norm and output projection.

``model(input_ids)`` returns logits ``[b, s, vocab]``; ``model(input_ids, labels=labels)``
returns the per-token loss ``[b, s]`` computed on the vocab-parallel logits without gathering
them. Under context parallelism, ``input_ids``, ``labels`` and ``position_ids`` are this rank's
load-balanced shard (``mcore.parallel.split_for_context_parallel``) and positions default to the
shard's global positions.

Under pipeline parallelism a ``GPTModel`` is one stage's model chunk (see ``GPTModel``), run by
the schedules of ``mcore.parallel.pipeline``.

Construction happens on the ``meta`` device; then, unless the model is being built on ``meta``
itself (``with torch.device("meta"):``, as ``mcore train`` does before wrapping it), each rank
allocates and fills only what it holds (:func:`mcore.parallel.init.materialize`). Every value
comes from one base seed, the tensor's global name and its position in the full tensor, so a
stage holds exactly the weights of the same components of the whole model and a TP or EP shard
exactly its slice of them: one seed gives one model for any TP, PP and EP layout, and no rank
draws a full copy of a sharded tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
from torch.utils.checkpoint import checkpoint

from mcore.core.training.profiling import ranges
from mcore.models.config import TransformerConfig
from mcore.models.context import ModelContext
from mcore.models.inference import KVCacheSpec, PagedBatch, RecurrentStateSpec
from mcore.models.layer import LayerSpec, TransformerLayer, layer_specs, mtp_layer_specs
from mcore.models.mtp import MultiTokenPrediction, MultiTokenPredictionLayer, mtp_targets
from mcore.models.packing import PackedSeqParams
from mcore.models.rope import RotaryEmbedding
from mcore.parallel import (
    ColumnParallelLinear,
    ParallelLayoutError,
    ParallelState,
    VocabParallelEmbedding,
    cp_local_positions,
    fused_linear_cross_entropy,
    gather_from_context_parallel,
    gather_from_tensor_parallel_region,
    mark_shared_embedding,
    mark_tp_partial_grad,
    reduce_tp_partial_grads,
    scatter_to_sequence_parallel_region,
    split_for_context_parallel,
    stage_layers,
    vocab_parallel_cross_entropy,
)
from mcore.parallel.init import materialize, peek_seed, set_init

if TYPE_CHECKING:
    from mcore.core.config import Config


class GPTModel(torch.nn.Module):
    """A decoder-only transformer language model, tensor/sequence/context/pipeline parallel.

    With ``parallel_state.pp_size > 1`` the model is this rank's pipeline stage: the first
    stage (``pre_process``) owns the embedding, the last (``post_process``) the final norm and
    the output layer, and each holds ``num_layers / pp`` layers under their global names (layer
    "17" is ``layers["17"]`` wherever it lives). With virtual pipeline stages, build one chunk
    per ``vp_stage`` in ``range(vp_size)``: chunk ``c`` of stage ``s`` holds virtual stage
    ``c * pp + s`` (Megatron's interleaved assignment), the embedding lives on chunk 0 of the
    first stage and the output layer on the last chunk of the last stage. ``num_layers`` must
    divide by ``pp * vp_size``.

    A stage without the embedding takes the previous stage's hidden states through
    :meth:`set_input_tensor` (Megatron's convention; the schedules call it); a stage without
    the output layer returns hidden states ``[s, b, h]`` (``[s / tp, b, h]`` under sequence
    parallelism) instead of logits or losses. Positions still come from the batch.

    Tied embeddings over stages: the last stage keeps its own copy of the word embeddings for
    the output layer, initialised equal to the first stage's, and
    ``mcore.parallel.pipeline.allreduce_embedding_grads(chunks, parallel_state)`` sums the two
    copies' gradients after backward, before the optimizer step.

    ``init_seed`` is the base seed of the weights (kept as ``self.init_seed`` for a later
    :func:`~mcore.parallel.init.materialize`); by default it is drawn from torch's global
    generator without advancing it, so ``torch.manual_seed(s)`` before building picks the
    weights, and the chunks a rank builds in a row agree with the single-process model.

    ``sections`` hands config sections of other packages to the modules that need them, e.g.
    ``{"moe": MoEConfig(...)}`` (a whole run ``Config`` is accepted too): with mcore-moe
    installed its ``[moe]`` section turns the chosen layers' MLPs into MoE layers.
    """

    def __init__(
        self,
        config: TransformerConfig,
        parallel_state: ParallelState | None = None,
        *,
        sequence_parallel: bool = False,
        spec: LayerSpec | None = None,
        registries: Any = None,
        vp_stage: int | None = None,
        vp_size: int | None = None,
        init_seed: int | None = None,
        sections: Mapping[str, Any] | Config | None = None,
    ) -> None:
        super().__init__()
        device = torch.get_default_device()
        seed = peek_seed() if init_seed is None else init_seed
        # The layout's groups are made outside the meta context: they hold real rank tables.
        parallel_state = parallel_state or ParallelState()
        with torch.device("meta"):
            self._build(
                config, parallel_state, sequence_parallel, spec, registries, vp_stage, vp_size,
                sections,
            )  # fmt: skip
        self.init_seed = seed
        if device.type != "meta":
            materialize(self, device=device, seed=seed)

    def _build(
        self,
        config: TransformerConfig,
        parallel_state: ParallelState | None,
        sequence_parallel: bool,
        spec: LayerSpec | None,
        registries: Any,
        vp_stage: int | None,
        vp_size: int | None,
        sections: Mapping[str, Any] | Config | None,
    ) -> None:
        """The modules of this stage, on the meta device (``__init__``'s arguments)."""
        if config.vocab_size is None:
            raise ValueError("TransformerConfig.vocab_size must be set to build a GPTModel")
        config.checked()
        ps = parallel_state or ParallelState()
        ps.check_divisible(vocab_size=config.vocab_size)
        vp_size, vp_stage = _virtual_stage(vp_size, vp_stage, ps.pp_size)
        layer_ids = stage_layers(
            config.num_layers,
            pp_size=ps.pp_size,
            pp_rank=ps.pp_rank,
            vp_size=vp_size,
            vp_stage=vp_stage,
            first_stage_layers=config.num_layers_in_first_pipeline_stage,
            last_stage_layers=config.num_layers_in_last_pipeline_stage,
            stage_counts=config.pipeline_stage_layer_counts if ps.pp_size > 1 else None,
        )
        ctx = ModelContext(config, ps, sequence_parallel, registries, _sections(sections))
        self.config, self.parallel_state = config, ps
        self.sections = ctx.sections  # other packages' sections (e.g. moe), for HF export
        self.sequence_parallel = ctx.sequence_parallel
        self.vp_stage, self.vp_size = vp_stage, vp_size
        self.pre_process = ps.is_first_pp_stage and vp_stage == 0
        self.post_process = ps.is_last_pp_stage and vp_stage == vp_size - 1
        self.input_tensor: torch.Tensor | None = None

        self.embedding = None
        self.position_embeddings = None
        # Multi-token prediction runs on the last stage and embeds tokens there too: without
        # the embedding on that chunk, it keeps a copy (stored and initialised under the
        # embedding's name, kept equal by allreduce_embedding_grads, as tied output layers do).
        self.mtp_copies_embedding = self.post_process and config.mtp_depth > 0
        if self.pre_process or self.mtp_copies_embedding:
            self.embedding = VocabParallelEmbedding(
                config.vocab_size,
                config.hidden_size,
                tp_group=ps.tp_group,
                init_method=ctx.init_method(),
                sequence_parallel=ctx.sequence_parallel,
            )
            if not self.pre_process:
                mark_shared_embedding(self.embedding.weight)
                self.embedding.weight.checkpoint_key = "embedding.weight"  # pyright: ignore[reportAttributeAccessIssue]
        if self.pre_process and config.position_embedding_type == "learned_absolute":
            self.position_embeddings = torch.nn.Embedding(
                config.max_position_embeddings, config.hidden_size
            )
            set_init(self.position_embeddings.weight, ctx.init_method())
        self.rotary = None
        if config.position_embedding_type == "rope":
            rope_dim = (
                config.qk_pos_emb_head_dim if config.multi_latent_attention else config.rotary_dim
            )
            self.rotary = RotaryEmbedding(rope_dim, config)
        specs = (
            dict.fromkeys(layer_ids, spec)
            if spec is not None
            else layer_specs(config, layer_ids, sections=ctx.sections, registries=ctx.registries)
        )
        # A dict with stable names: a pipeline stage keeps layer "17" called "17".
        layers = {}
        for i in layer_ids:
            layers[str(i)] = TransformerLayer(ctx, specs[i], layer_number=i)
        self.layers = torch.nn.ModuleDict(layers)

        self.final_layernorm = None
        self.output_layer = None
        if self.post_process:
            self.final_layernorm = ctx.norm(config.hidden_size)
            if ctx.sequence_parallel:
                mark_tp_partial_grad(*self.final_layernorm.parameters())
            # Tied and on a chunk with the embedding (or MTP's copy of it): reuse that table.
            # Tied on another stage: a copy of it, stored and initialised under the embedding's
            # name (same full shape, same row split over TP), kept equal by
            # allreduce_embedding_grads.
            shares_table = self.tied_embeddings and self.embedding is not None
            copies_table = self.tied_embeddings and not shares_table
            self.output_layer = ColumnParallelLinear(
                config.hidden_size,
                config.vocab_size,
                tp_group=ps.tp_group,
                bias=False,
                gather_output=False,
                sequence_parallel=ctx.sequence_parallel,
                init_method=ctx.init_method(),
                skip_weight_param_allocation=shares_table,
            )
            if copies_table:
                mark_shared_embedding(self.output_layer.weight)
                # The same tensor as the first stage's table: checkpoints store it once.
                self.output_layer.weight.checkpoint_key = "embedding.weight"  # pyright: ignore[reportAttributeAccessIssue]
        self.mtp = None
        if self.post_process and config.mtp_depth > 0:
            self.mtp = MultiTokenPrediction(
                ctx,
                mtp_layer_specs(config, spec, sections=ctx.sections, registries=ctx.registries),
                first_layer_number=config.num_layers,
            )
        # The first stage's table has a copy on the last stage (tied output layer, or MTP's).
        copied = self.tied_embeddings or config.mtp_depth > 0
        if copied and self.pre_process and not self.post_process and self.embedding is not None:
            mark_shared_embedding(self.embedding.weight)
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

    def set_input_tensor(self, input_tensor: torch.Tensor | list | None) -> None:
        """Hidden states from the previous pipeline stage, used by the next ``forward`` of a
        stage without the embedding (a one-element list is accepted, as Megatron passes)."""
        if isinstance(input_tensor, (list, tuple)):
            (input_tensor,) = input_tensor
        self.input_tensor = cast("torch.Tensor | None", input_tensor)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        loss_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[b, s, vocab]``, or with ``labels`` the per-token loss ``[b, s]``; a stage
        without the output layer returns its hidden states ``[s, b, h]`` instead.

        ``packed_seq_params``: the rows hold several sequences each (see
        :mod:`mcore.models.packing`): attention stays within each; pass its ``position_ids()``.

        With multi-token prediction (``mtp_num_layers``) and ``labels``, the returned loss is
        still the LM loss; the MTP depths' loss (tokens where ``loss_mask`` ``[b, s]`` is 0 do
        not count) reaches backward through it (see :mod:`mcore.models.mtp`). The last stage
        needs ``input_ids`` then, to embed the shifted tokens.
        """
        x, position_ids, mask = self._main_stack(input_ids, position_ids, packed_seq_params)
        if not self.post_process:
            return x
        x = self._final_norm(x)
        if labels is None:
            return self._logits(x)
        loss = self._per_token_loss(x, labels)  # [s, b]
        if self.mtp is not None:
            loss = self._attach_mtp_loss(
                loss, x, input_ids, position_ids, labels, loss_mask, packed_seq_params, mask
            )
        return loss.t().contiguous()

    def mtp_logits(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> list[torch.Tensor]:
        """Logits ``[b, s, vocab]`` of each multi-token-prediction depth: depth ``k`` at
        position ``t`` predicts token ``t + k + 1`` (its last ``k`` positions see no real
        token). Needs the whole model on this rank's chunk (one pipeline stage)."""
        if self.mtp is None:
            raise ValueError("mtp_logits: this model has no multi-token-prediction depths")
        if not (self.pre_process and self.post_process):
            raise ValueError("mtp_logits needs a single-stage model (no pipeline parallelism)")
        x, position_ids, mask = self._main_stack(input_ids, position_ids, packed_seq_params)
        hidden = self._mtp_hidden(
            self._final_norm(x), input_ids, position_ids, packed_seq_params, mask
        )
        return [self._logits(h) for h in hidden]

    def vocab_parallel_logits(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """This rank's vocabulary shard of the logits, ``[s, b, vocab / tp]``, not gathered:
        for losses computed on the shards (distillation). The last pipeline stage only."""
        if not self.post_process:
            raise ValueError("vocab_parallel_logits: this chunk has no output layer")
        x, _, _ = self._main_stack(input_ids, position_ids, packed_seq_params)
        return self._output(self._final_norm(x))

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's final norm of hidden states ``x``."""
        assert self.final_layernorm is not None, "only the last pipeline stage has it"
        return self.final_layernorm(x)

    def _output_layer(self) -> ColumnParallelLinear:
        assert self.output_layer is not None, "only the last pipeline stage has it"
        return self.output_layer

    def _output(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's vocabulary shard of the logits of final-normed ``x``."""
        return self._output_layer()(x, weight=self._output_weight())

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embedding of ``input_ids`` ``[s, b]`` (on chunks that hold the table)."""
        assert self.embedding is not None, "only the first stage (and MTP's last) has it"
        return self.embedding(input_ids)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Gathered logits ``[b, s, vocab]`` of final-normed hidden states ``[s, b, h]``."""
        logits = self._output(x)  # [s, b, vocab / tp]
        logits = gather_from_tensor_parallel_region(logits, self.parallel_state.tp_group)
        return logits.transpose(0, 1).contiguous()

    def _per_token_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross entropy ``[s, b]`` of final-normed ``x`` against ``labels`` ``[b, s]``, on
        the vocab-parallel logits (chunk by chunk with cross_entropy_loss_fusion, never whole;
        the MTP depths' losses come here too)."""
        if self.config.cross_entropy_loss_fusion:
            layer, weight = self._output_layer(), self._output_weight()
            return fused_linear_cross_entropy(
                x,
                layer.weight if weight is None else weight,
                labels.t(),
                tp_group=layer.tp_group,
                sequence_parallel=layer.sequence_parallel,
                chunk_tokens=self.config.cross_entropy_chunk_tokens,
            )
        logits = self._output(x)
        return vocab_parallel_cross_entropy(
            logits, labels.t(), tp_group=self.parallel_state.tp_group
        )

    def _output_weight(self) -> torch.Tensor | None:
        return (
            self.embedding.weight if self.tied_embeddings and self.embedding is not None else None
        )

    def _run_layer(self, layer, x, rotary, mask, packed_seq_params) -> torch.Tensor:
        with ranges.range("layer", layer.layer_number):  # profile.nvtx_ranges
            if self.recompute_layers and torch.is_grad_enabled():
                return checkpoint(
                    layer, x, rotary, None, mask, packed_seq_params, use_reentrant=False
                )
            if mask is not None:
                return layer(x, rotary, attn_mask=mask, packed_seq_params=packed_seq_params)
            return layer(x, rotary)

    def _mtp_hidden(self, x, input_ids, position_ids, packed_seq_params, mask):
        """Each MTP depth's final-normed hidden states, from the main ones ``x``."""
        if input_ids is None:
            raise ValueError(
                "GPTModel.forward needs input_ids on the last pipeline stage too when the model "
                "has multi-token-prediction depths (they embed the shifted tokens)"
            )
        if position_ids is None:
            b, s = input_ids.shape
            position_ids = self.default_positions(b, s, input_ids.device)
        rotaries = {}

        def run_layer(k, layer, h):
            if k not in rotaries:  # depth k sits at the positions of the tokens it embeds
                rotaries[k] = self.rotary(position_ids + k) if self.rotary is not None else None
            return self._run_layer(layer, h, rotaries[k], mask, packed_seq_params)

        assert self.mtp is not None, "only a model with MTP depths has them"
        return self.mtp.hidden_states(
            x, input_ids, lambda ids: self._embed(ids.t()), run_layer, self._mtp_shift
        )

    def _mtp_shift(self, x: torch.Tensor, depth: int, fill: int | float = 0) -> torch.Tensor:
        """:func:`~mcore.models.mtp.mtp_targets` of this rank's ``[b, s]`` shard of a
        sequence: under context parallelism the shards are gathered (token ids and masks,
        b x s numbers), shifted as a whole and split again."""
        group = self.parallel_state.cp_group
        if self.parallel_state.cp_size == 1:
            return mtp_targets(x, depth, fill)
        whole = gather_from_context_parallel(x, dim=1, cp_group=group)
        return split_for_context_parallel(mtp_targets(whole, depth, fill), dim=1, cp_group=group)

    def _attach_mtp_loss(
        self, loss, x, input_ids, position_ids, labels, loss_mask, packed_seq_params, mask
    ) -> torch.Tensor:
        hidden = self._mtp_hidden(x, input_ids, position_ids, packed_seq_params, mask)
        depth_losses = [
            self._per_token_loss(h, self._mtp_shift(labels, k)).t()
            for k, h in enumerate(hidden, start=1)
        ]
        assert self.mtp is not None, "only a model with MTP depths has them"
        return self.mtp.attach_loss(
            loss, depth_losses, labels, loss_mask, packed_seq_params, self._mtp_shift,
            counts=self._cp_mean_counts if self.parallel_state.cp_size > 1 else None,
        )  # fmt: skip

    def _cp_mean_counts(self, local: torch.Tensor) -> torch.Tensor:
        """Per-depth valid-token counts that make each CP rank's MTP loss its share of the
        whole sequence's mean: the sum over the CP group / its size (gradients are averaged
        over data and context parallel ranks, as the LM loss's are)."""
        total = local.detach().clone()
        torch.distributed.all_reduce(total, group=self.parallel_state.cp_group)
        return total / self.parallel_state.cp_size

    def _main_stack(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        packed_seq_params: PackedSeqParams | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The embedding (or the previous stage's hidden states) through this chunk's layers:
        ``(hidden [s, b, h], position_ids, packed attention mask)``."""
        if self.pre_process:
            if input_ids is None:
                raise ValueError("GPTModel.forward needs input_ids on the embedding stage")
            b, s = input_ids.shape
            if position_ids is None:
                position_ids = self.default_positions(b, s, input_ids.device)
            x = self._embed(input_ids.t())  # [s, b, h], or [s / tp, b, h] with SP
            if self.position_embeddings is not None:
                pos = self.position_embeddings(position_ids.t())
                if self.sequence_parallel:
                    pos = scatter_to_sequence_parallel_region(pos, self.parallel_state.tp_group)
                x = x + pos
        else:
            x = self.input_tensor
            if x is None:
                raise ValueError(
                    "this pipeline stage has no embedding: call set_input_tensor(hidden) with "
                    "the previous stage's output before forward (the schedules do)"
                )
            if position_ids is None and self.rotary is not None:
                s_local, b = x.shape[:2]  # under sequence parallelism s is split over TP
                s = s_local * (self.parallel_state.tp_size if self.sequence_parallel else 1)
                position_ids = self.default_positions(b, s, x.device)
        rotary = self.rotary(position_ids) if self.rotary is not None else None
        mask = None
        if packed_seq_params is not None:
            mask = packed_seq_params.attention_mask(x.device)
        for layer in self.layers.values():
            x = self._run_layer(layer, x, rotary, mask, packed_seq_params)
        return x, position_ids, mask

    def kv_cache_specs(self, mtp: bool = False) -> dict[int, KVCacheSpec]:
        """What each attention layer keeps per token in a paged KV cache, by layer number
        (layers without attention keep nothing); with ``mtp``, the multi-token-prediction
        depths' layers too (numbered after the main stack), which speculative decoding runs."""
        specs = {}
        layers = list(self.layers.values())
        if mtp and self.mtp is not None:
            depths = cast("list[MultiTokenPredictionLayer]", list(self.mtp.layers))
            layers += [m for depth in depths for m in depth.block]
        for layer in layers:
            attention = layer.self_attention
            if attention is None:
                continue
            spec = getattr(attention, "kv_cache_spec", None)
            if spec is None:
                raise NotImplementedError(
                    f"layer {layer.layer_number}: attention {type(attention).__name__} has no "
                    "kv_cache_spec(), so it cannot run over a paged KV cache"
                )
            specs[layer.layer_number] = spec()
        return specs

    def recurrent_state_specs(self) -> dict[int, RecurrentStateSpec]:
        """What each sequence-mixer layer (Mamba-2, gated delta net) keeps per request at
        inference, by layer number (other layers keep no recurrent state)."""
        layers = cast("list[TransformerLayer]", list(self.layers.values()))
        return {
            layer.layer_number: layer.mixer.recurrent_state_spec()
            for layer in layers
            if layer.mixer is not None
        }

    def forward_paged(
        self,
        batch: PagedBatch,
        hidden_states: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[len(batch.logits_rows), vocab]`` of the inference engine's flat token
        batch: every attention layer writes the tokens' keys/values into the paged cache and
        attends over each request's cached context (see ``mcore.models.inference``).

        Only the rows in ``batch.logits_rows`` go through the output layer. On a pipeline
        stage, ``hidden_states`` ``[T, 1, h]`` (the previous stage's output) stand in for the
        embedding, and a stage before the last returns its own ``[T, 1, h]``.
        ``return_hidden``: also return every row's final-normed hidden states ``[T, 1, h]``
        (what the first multi-token-prediction depth reads, :meth:`mtp_forward_paged`).
        """
        if self.sequence_parallel:
            raise NotImplementedError(
                "forward_paged needs sequence_parallel=False (build the model without it)"
            )
        if self.pre_process == (hidden_states is not None):
            raise ValueError(
                "forward_paged: the first pipeline stage embeds the tokens (no hidden_states); "
                "every later stage needs the previous stage's hidden_states"
            )
        batch.begin_forward()
        positions = batch.positions.unsqueeze(0)  # [1, T]
        if self.pre_process:
            x = self._embed(batch.input_ids.unsqueeze(1))  # [T, 1, h]
            if self.position_embeddings is not None:
                x = x + self.position_embeddings(positions.t())
        else:
            assert hidden_states is not None  # checked above
            x = hidden_states
        rotary = self.rotary(positions) if self.rotary is not None else None
        for layer in self.layers.values():
            x = layer(x, rotary, paged=batch)
        if not self.post_process:
            return x
        if return_hidden:
            normed = self._final_norm(x)
            return self._paged_logits(normed[batch.logits_rows]), normed
        return self._paged_logits(self._final_norm(x[batch.logits_rows]))

    def _paged_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Gathered logits ``[R, vocab]`` of final-normed rows ``[R, 1, h]``."""
        logits = self._output(x)
        logits = gather_from_tensor_parallel_region(logits, self.parallel_state.tp_group)
        return logits[:, 0]

    def mtp_forward_paged(
        self, batch: PagedBatch, hidden: torch.Tensor, depth: int, new_batch: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Multi-token-prediction depth ``depth`` (1-based) over the engine's flat batch:
        ``batch.input_ids`` hold, at each row of position ``t``, the token at ``t + depth``,
        and ``hidden`` ``[T, 1, h]`` the previous depth's final-normed hidden states at the
        same rows (the main model's, from ``forward_paged(return_hidden=True)``, for depth 1).
        The depth's layers keep their keys/values at position ``t`` in their own paged cache
        (``kv_cache_specs(mtp=True)``). Returns this depth's hidden states ``[T, 1, h]`` and
        the logits ``[len(batch.logits_rows), vocab]`` of its prediction of token
        ``t + depth + 1``: the draft of speculative decoding. ``new_batch=False``: the batch
        ran the previous depth (same rows and positions, new ids), so its attention masks are
        kept."""
        if self.mtp is None or not 1 <= depth <= self.mtp.depth:
            have = 0 if self.mtp is None else self.mtp.depth
            raise ValueError(
                f"mtp_forward_paged: depth {depth}, but the model has {have} MTP depths"
            )
        if new_batch:
            batch.begin_forward()
        x = self._embed(batch.input_ids.unsqueeze(1))  # [T, 1, h]
        # Depth k sits at the positions of the tokens it embeds (t + k), as in training.
        positions = (batch.positions + depth).unsqueeze(0)
        rotary = self.rotary(positions) if self.rotary is not None else None
        out = self.mtp.layers[depth - 1](x, hidden, lambda layer, y: layer(y, rotary, paged=batch))
        return out, self._paged_logits(out[batch.logits_rows])

    def reduce_partial_grads(self) -> None:
        """Sum over TP the gradients of replicated parameters that each rank sees part of.

        Needed with sequence parallelism or qk-norm under TP; call after backward.
        """
        reduce_tp_partial_grads(self, self.parallel_state.tp_group)


def _sections(sections: Any) -> dict[str, Any]:
    """``sections`` as a dict by name; a run ``Config`` gives every section it holds."""
    if sections is None:
        return {}
    if hasattr(sections, "section_names"):
        return {name: getattr(sections, name) for name in sections.section_names()}
    return dict(sections)


def _virtual_stage(vp_size: int | None, vp_stage: int | None, pp_size: int) -> tuple[int, int]:
    """``(vp_size, vp_stage)`` with defaults filled in and the combination checked."""
    if vp_size is None:
        if vp_stage not in (None, 0):
            raise ParallelLayoutError(
                f"vp_stage is {vp_stage}: pass vp_size (virtual_pipeline_model_parallel_size) "
                "too, to build one of several model chunks"
            )
        return 1, 0
    vp_stage = 0 if vp_stage is None else vp_stage
    if vp_size > 1 and pp_size == 1:
        raise ParallelLayoutError(
            f"virtual_pipeline_model_parallel_size is {vp_size}, but interleaving needs "
            "pipeline_model_parallel_size > 1"
        )
    return vp_size, vp_stage


def build_gpt_model(config: TransformerConfig, parallel_state: ParallelState | None = None, **kw):
    """The ``model`` registry entry ``gpt``."""
    return GPTModel(config, parallel_state, **kw)
