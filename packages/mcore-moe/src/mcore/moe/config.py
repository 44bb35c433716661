"""The ``[moe]`` config section; knob names follow Megatron's ``--moe-*`` arguments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mcore.core import Config, ConfigErrors, component


@dataclass(kw_only=True)
class MoEConfig:
    """Mixture of experts: experts, routing and token dispatch."""

    num_experts: int | None = None
    """Routed experts per MoE layer; unset means a dense model."""
    router_type: str = component("router", "topk")
    """Router by registry name; a plugin's router is selected here."""
    router_topk: int = 2
    """Experts each token is routed to."""
    router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    """How router logits become scores."""
    router_load_balancing_type: Literal["aux_loss", "seq_aux_loss", "none"] = "aux_loss"
    """Load-balancing loss: over the global batch, per sequence, or none."""
    aux_loss_coeff: float = 0.0
    """Weight of the load-balancing loss."""
    z_loss_coeff: float | None = None
    """Weight of the router z-loss; unset disables it."""
    token_dispatcher_type: str = component("token_dispatcher", "alltoall")
    """Token dispatcher by registry name (allgather, alltoall, flex)."""
    flex_dispatcher_backend: str | None = component("flex_backend", None)
    """Backend of the flex dispatcher (deepep, hybridep); used only with flex."""
    ffn_hidden_size: int | None = None
    """Width of each expert's MLP; unset means the model's ffn_hidden_size."""
    shared_expert_intermediate_size: int | None = None
    """Width of the shared expert; unset means no shared expert."""
    grouped_gemm: bool = True
    """Run all local experts in one grouped matmul."""
    expert_capacity_factor: float | None = None
    """Per-expert capacity as a multiple of the even share; unset means no token dropping."""

    def validate(self, errors: ConfigErrors) -> None:
        for name in ("num_experts", "ffn_hidden_size", "shared_expert_intermediate_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                errors.add(name, f"must be >= 1, got {value}")
        if self.router_topk < 1:
            errors.add("router_topk", f"must be >= 1, got {self.router_topk}")
        elif self.num_experts is not None and self.router_topk > self.num_experts:
            errors.add(
                "router_topk",
                f"{self.router_topk} exceeds num_experts ({self.num_experts})",
            )
        if self.expert_capacity_factor is not None and self.expert_capacity_factor <= 0:
            errors.add("expert_capacity_factor", f"must be > 0, got {self.expert_capacity_factor}")
        if self.flex_dispatcher_backend is not None and self.token_dispatcher_type != "flex":
            errors.add(
                "flex_dispatcher_backend",
                f"is set but token_dispatcher_type is {self.token_dispatcher_type!r}; "
                "set token_dispatcher_type = 'flex' to use it",
            )


def validate_against_parallel(config: Config, errors: ConfigErrors) -> None:
    """Experts must split evenly over expert-parallel ranks."""
    if "parallel" not in config or config.moe.num_experts is None:
        return
    ep = config.parallel.expert_model_parallel_size
    if config.moe.num_experts % ep:
        errors.add(
            "moe.num_experts",
            f"{config.moe.num_experts} experts do not divide over "
            f"parallel.expert_model_parallel_size={ep}",
        )
