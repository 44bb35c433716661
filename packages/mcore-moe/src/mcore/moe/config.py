"""The ``[moe]`` config section; knob names follow Megatron's ``--moe-*`` arguments."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mcore.core import Config, ConfigErrors, component

QUANTIZATION_ALIGNMENT = {"fp8": 16, "fp4": 128}
"""Tokens per expert must be a multiple of this for the quantised grouped GEMM."""


@dataclass(kw_only=True)
class MoEConfig:
    """Mixture of experts: experts, routing and token dispatch."""

    num_experts: int | None = field(default=None, metadata={"megatron": "--num-experts"})
    """Routed experts per MoE layer; unset means a dense model."""
    ffn_hidden_size: int | None = field(
        default=None, metadata={"megatron": "--moe-ffn-hidden-size"}
    )
    """Width of each expert's MLP; unset means the model's ffn_hidden_size."""
    layer_freq: int = field(default=1, metadata={"megatron": "--moe-layer-freq"})
    """Every how many layers an MLP is an MoE layer (1: all, 2: every other one)."""
    first_k_dense: int = 0
    """The first k layers keep a dense MLP (DeepSeek's first_k_dense_replace)."""

    # --- routing -------------------------------------------------------------------------
    router_type: str = component("router", "topk")
    """Router by registry name; a plugin's router is selected here."""
    router_topk: int = field(default=2, metadata={"megatron": "--moe-router-topk"})
    """Experts each token is routed to."""
    router_score_function: Literal["softmax", "sigmoid"] = field(
        default="softmax", metadata={"megatron": "--moe-router-score-function"}
    )
    """How router logits become scores."""
    router_pre_softmax: bool = field(
        default=False, metadata={"megatron": "--moe-router-pre-softmax"}
    )
    """Softmax over all experts before choosing the top-k (else over the chosen k only)."""
    router_norm_topk_prob: bool = False
    """Renormalise the chosen k probabilities to sum to one (softmax over the chosen k already
    does; with sigmoid scores or router_pre_softmax this is the switch)."""
    router_num_groups: int | None = field(
        default=None, metadata={"megatron": "--moe-router-num-groups"}
    )
    """Group-limited routing: experts form this many groups (DeepSeek's n_group)."""
    router_group_topk: int | None = field(
        default=None, metadata={"megatron": "--moe-router-group-topk"}
    )
    """Group-limited routing: tokens pick experts only from this many groups (topk_group)."""
    router_topk_scaling_factor: float | None = field(
        default=None, metadata={"megatron": "--moe-router-topk-scaling-factor"}
    )
    """Multiply the chosen probabilities by this (DeepSeek's routed_scaling_factor)."""
    router_enable_expert_bias: bool = field(
        default=False, metadata={"megatron": "--moe-router-enable-expert-bias"}
    )
    """Aux-loss-free balancing: a per-expert bias added to the scores for choosing experts,
    moved toward balance after every step (DeepSeek-V3's e_score_correction_bias)."""
    router_bias_update_rate: float = field(
        default=1e-3, metadata={"megatron": "--moe-router-bias-update-rate"}
    )
    """Step of the expert-bias update, per optimizer step."""
    router_dtype: Literal["fp32", "native"] = "fp32"
    """Compute router logits and scores in fp32 (recommended) or the model's dtype."""
    router_load_balancing_type: Literal["aux_loss", "seq_aux_loss", "global_aux_loss", "none"] = (
        field(default="aux_loss", metadata={"megatron": "--moe-router-load-balancing-type"})
    )
    """Load-balancing loss over the micro-batch, per sequence, over the global batch, or none."""
    aux_loss_coeff: float = field(default=0.0, metadata={"megatron": "--moe-aux-loss-coeff"})
    """Weight of the load-balancing loss."""
    z_loss_coeff: float | None = field(default=None, metadata={"megatron": "--moe-z-loss-coeff"})
    """Weight of the router z-loss; unset disables it."""
    expert_capacity_factor: float | None = field(
        default=None, metadata={"megatron": "--moe-expert-capacity-factor"}
    )
    """Per-expert capacity as a multiple of the even share; unset means no token dropping."""
    token_drop_policy: Literal["probs", "position"] = field(
        default="probs", metadata={"megatron": "--moe-token-drop-policy"}
    )
    """Which tokens an over-full expert drops: lowest probability, or latest in the batch."""
    pad_expert_input_to_capacity: bool = field(
        default=False, metadata={"megatron": "--moe-pad-expert-input-to-capacity"}
    )
    """Pad every expert's input to its capacity (needs expert_capacity_factor)."""
    router_padding_for_quantization: bool = field(
        default=False, metadata={"megatron": "--moe-router-padding-for-fp8"}
    )
    """Pad each expert's token count to a multiple of the quantised GEMM's alignment by routing
    extra tokens to it with zero probability."""
    router_padding_quantization: Literal["fp8", "fp4"] = "fp8"
    """Which alignment the padding targets: fp8 (16 tokens) or fp4 (128 tokens)."""

    # --- dispatch and experts ------------------------------------------------------------
    token_dispatcher_type: str = component(
        "token_dispatcher", "alltoall", metadata={"megatron": "--moe-token-dispatcher-type"}
    )
    """Token dispatcher by registry name (allgather, alltoall, flex)."""
    flex_dispatcher_backend: str | None = component("flex_backend", None)
    """Backend of the flex dispatcher (deepep, hybridep); used only with flex."""
    grouped_gemm: bool = field(default=True, metadata={"megatron": "--moe-grouped-gemm"})
    """Run all local experts in one grouped matmul; false loops over experts (reference)."""
    permute_fusion: bool = field(default=False, metadata={"megatron": "--moe-permute-fusion"})
    """Fused Triton kernels for permute/unpermute and the weighted activation."""
    shared_expert_intermediate_size: int | None = field(
        default=None, metadata={"megatron": "--moe-shared-expert-intermediate-size"}
    )
    """Width of the shared expert; unset means no shared expert."""
    shared_expert_gate: bool = False
    """Scale the shared expert's output by a learned sigmoid gate (Qwen2-MoE)."""
    per_layer_logging: bool = field(default=False, metadata={"megatron": "--moe-per-layer-logging"})
    """Log the load-balancing loss and expert load of every MoE layer, not only their mean."""

    @property
    def padding_alignment(self) -> int | None:
        """Tokens per expert are padded to a multiple of this, or not at all (None)."""
        if not self.router_padding_for_quantization:
            return None
        return QUANTIZATION_ALIGNMENT[self.router_padding_quantization]

    def mlp_for_layer(self, layer_number: int) -> str | None:
        """The ``mlp`` registry name for layer ``layer_number``: ``moe`` for MoE layers, else
        None (the model's default). ``GPTModel`` asks its sections this."""
        return "moe" if self.is_moe_layer(layer_number) else None

    def is_moe_layer(self, layer_number: int) -> bool:
        """Whether layer ``layer_number`` (0-based) has an MoE MLP rather than a dense one."""
        if self.num_experts is None or layer_number < self.first_k_dense:
            return False
        return (layer_number - self.first_k_dense) % self.layer_freq == 0

    def validate(self, errors: ConfigErrors) -> None:
        for name in ("num_experts", "ffn_hidden_size", "shared_expert_intermediate_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                errors.add(name, f"must be >= 1, got {value}")
        if self.layer_freq < 1:
            errors.add("layer_freq", f"must be >= 1, got {self.layer_freq}")
        if self.first_k_dense < 0:
            errors.add("first_k_dense", f"must be >= 0, got {self.first_k_dense}")
        if self.router_topk < 1:
            errors.add("router_topk", f"must be >= 1, got {self.router_topk}")
        elif self.num_experts is not None and self.router_topk > self.num_experts:
            errors.add(
                "router_topk",
                f"{self.router_topk} exceeds num_experts ({self.num_experts})",
            )
        self._validate_groups(errors)
        if self.expert_capacity_factor is not None and self.expert_capacity_factor <= 0:
            errors.add("expert_capacity_factor", f"must be > 0, got {self.expert_capacity_factor}")
        if self.pad_expert_input_to_capacity and self.expert_capacity_factor is None:
            errors.add(
                "pad_expert_input_to_capacity",
                "needs expert_capacity_factor: without a capacity there is nothing to pad to",
            )
        if self.router_padding_for_quantization and self.expert_capacity_factor is not None:
            errors.add(
                "router_padding_for_quantization",
                "cannot be combined with expert_capacity_factor (Megatron refuses it too)",
            )
        for name in ("aux_loss_coeff", "router_bias_update_rate"):
            if getattr(self, name) < 0:
                errors.add(name, f"must be >= 0, got {getattr(self, name)}")
        if self.z_loss_coeff is not None and self.z_loss_coeff < 0:
            errors.add("z_loss_coeff", f"must be >= 0, got {self.z_loss_coeff}")
        if self.flex_dispatcher_backend is not None and self.token_dispatcher_type != "flex":
            errors.add(
                "flex_dispatcher_backend",
                f"is set but token_dispatcher_type is {self.token_dispatcher_type!r}; "
                "set token_dispatcher_type = 'flex' to use it",
            )
        if self.token_dispatcher_type == "flex" and self.flex_dispatcher_backend is None:
            errors.add(
                "flex_dispatcher_backend",
                "token_dispatcher_type = 'flex' needs a backend: deepep or hybridep",
            )

    def _validate_groups(self, errors: ConfigErrors) -> None:
        groups, group_topk = self.router_num_groups, self.router_group_topk
        if (groups is None) != (group_topk is None):
            errors.add(
                "router_group_topk" if groups is not None else "router_num_groups",
                "router_num_groups and router_group_topk must be set together",
            )
            return
        if groups is None or group_topk is None:
            return
        if groups < 1 or not 1 <= group_topk <= groups:
            errors.add(
                "router_group_topk",
                f"must lie in [1, router_num_groups={groups}], got {group_topk}",
            )
        elif self.num_experts is not None and self.num_experts % groups:
            errors.add(
                "router_num_groups",
                f"{self.num_experts} experts do not split into {groups} groups",
            )


def validate_against_parallel(config: Config, errors: ConfigErrors) -> None:
    """Experts must split evenly over expert-parallel ranks; MoE under TP needs SP."""
    if "parallel" not in config or config.moe.num_experts is None:
        return
    parallel = config.parallel
    ep = parallel.expert_model_parallel_size
    if config.moe.num_experts % ep:
        errors.add(
            "moe.num_experts",
            f"{config.moe.num_experts} experts do not divide over "
            f"parallel.expert_model_parallel_size={ep}",
        )
    if parallel.tensor_model_parallel_size > 1 and not parallel.sequence_parallel:
        errors.add(
            "parallel.sequence_parallel",
            "MoE layers under tensor parallelism need sequence_parallel = true, so that every "
            "rank routes its own tokens",
        )
