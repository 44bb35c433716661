"""The ``[inference]`` config section: engine capacity, KV cache, CUDA graphs and the server."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mcore.core import ConfigErrors


@dataclass(kw_only=True)
class InferenceConfig:
    """Inference engine, KV cache and server."""

    max_requests: int = field(default=64, metadata={"megatron": "--inference-max-requests"})
    """Requests in flight at once (running; more wait in the queue)."""
    max_tokens: int | None = 2048
    """Tokens per engine step, prefill chunks and decodes together: longer prompts are
    prefilled in chunks over several steps; unset means no cap (whole prompts at once)."""
    max_sequence_length: int = field(
        default=4096, metadata={"megatron": "--inference-max-seq-length"}
    )
    """Longest prompt plus completion (capped by the model's max_position_embeddings)."""
    block_size_tokens: int = field(
        default=256, metadata={"megatron": "--inference-dynamic-batching-block-size"}
    )
    """Tokens per paged KV-cache block."""
    buffer_size_gb: float = field(
        default=4.0, metadata={"megatron": "--inference-dynamic-batching-buffer-size-gb"}
    )
    """Memory reserved for the KV cache (never more than max_requests full-length
    sequences need); a hybrid model's recurrent states (max_requests + 1 slots) come out of it
    first."""
    kv_cache_blocks: int | None = None
    """Number of KV-cache blocks, overriding buffer_size_gb (tests, tight memory)."""
    enable_prefix_caching: bool = True
    """Share the cache blocks of identical prompt prefixes between requests (always off for
    models with recurrent state: Mamba, gated delta net)."""
    suspend_mode: Literal["offload", "recompute"] = "offload"
    """What suspend() does with the KV cache: copy the blocks in use to host memory and back
    on resume (bit-exact), or drop them and recompute on resume (frees host memory too)."""
    enable_cuda_graph: bool = field(default=False, metadata={"megatron": "--enable-cuda-graph"})
    """Capture CUDA graphs for a set of batch shapes and replay them (GPU only)."""
    cuda_graph_decode_sizes: list[int] | None = None
    """Decode-request counts to capture; unset means 1, 2, 4, 8, ... up to max_requests."""
    cuda_graph_prefill_tokens: list[int] | None = None
    """Prefill-chunk token counts to capture for steps mixing one prefill request with decodes;
    unset means 64 and 256 (capped by max_tokens); an empty list captures decode-only graphs."""
    linear_backend: str = "auto"
    """What the linear layers' matmuls run, by name in the ``linear_backend`` registry:
    torch (F.linear), onednn_packed (weights prepacked for oneDNN's CPU GEMM, layers of 0.2M
    weights and more), or a plugin's; auto means onednn_packed on a CPU in fp32, else torch."""
    device: str | None = None
    """Device of the engine (cuda, cuda:1, cpu); unset means cuda when available."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype of the model and the KV cache; auto means bfloat16 on CUDA, else float32."""
    seed: int = 0
    """Seed of the sampler for requests that do not give their own."""
    host: str = "127.0.0.1"
    """Address the HTTP server binds to."""
    port: int | None = None
    """Port of the HTTP server; unset picks a free one."""
    api_key: str | None = None
    """Require this bearer token on every request."""
    served_model_name: str | None = None
    """Model name the server reports and accepts; unset means the model directory's name."""
    data_parallel_size: int = field(default=1, metadata={"aliases": ("dp",)})
    """Model replicas behind the server, each its own engine process(es), joined by the ZMQ
    coordinator, which routes each request to one replica; 1 (with tensor_model_parallel_size
    1) runs the engine inside the server process."""
    tensor_model_parallel_size: int = field(default=1, metadata={"aliases": ("tp",)})
    """Processes each model replica is split over by tensor parallelism (attention heads, MLP
    and expert columns, vocabulary): each loads only its shard and they step in lockstep."""
    pipeline_model_parallel_size: int = field(default=1, metadata={"aliases": ("pp",)})
    """Pipeline stages of each model replica: each stage's processes hold its layers and their
    KV cache, and pass hidden states on to the next stage."""
    expert_model_parallel_size: int = field(default=1, metadata={"aliases": ("ep",)})
    """Replicas whose MoE layers share their experts: each of these engine processes holds
    num_experts / ep experts and its own requests, and they step together (a multiple of it
    makes data_parallel_size; tensor and pipeline sizes 1)."""
    num_speculative_tokens: int = 0
    """Speculative decoding: tokens each decoding request drafts per step with the model's
    multi-token-prediction depths (at most mtp_num_layers), all verified by one forward of the
    model; a request's sampling parameters may ask for fewer (0 turns it off for that
    request). Greedy outputs are those of plain decoding; sampled ones keep its distribution
    (rejection sampling). 0: off (the MTP layers' KV cache is not allocated)."""
    heartbeat_timeout_s: float = 10.0
    """The coordinator declares an engine rank dead after this long without a heartbeat."""

    def validate(self, errors: ConfigErrors) -> None:
        for name in (
            "max_requests",
            "max_tokens",
            "max_sequence_length",
            "block_size_tokens",
            "data_parallel_size",
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "expert_model_parallel_size",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                errors.add(name, f"must be >= 1, got {value}")
        ep = self.expert_model_parallel_size
        if ep > 1 and self.data_parallel_size % ep:
            errors.add(
                "expert_model_parallel_size",
                f"{ep} must divide data_parallel_size ({self.data_parallel_size}): each "
                "expert-parallel rank is a replica with its own requests",
            )
        if ep > 1 and self.replica_size > 1:
            errors.add(
                "expert_model_parallel_size",
                f"expert-parallel engines run with tensor_model_parallel_size and "
                f"pipeline_model_parallel_size 1 for now (got {self.tensor_model_parallel_size} "
                f"and {self.pipeline_model_parallel_size})",
            )
        if self.num_speculative_tokens < 0:
            errors.add("num_speculative_tokens", f"must be >= 0, got {self.num_speculative_tokens}")
        if self.num_speculative_tokens and self.replica_size * self.expert_model_parallel_size > 1:
            errors.add(
                "num_speculative_tokens",
                "speculative decoding runs on single-process engines for now (tensor, pipeline "
                "and expert parallel sizes 1); replicate with data_parallel_size instead",
            )
        if self.kv_cache_blocks is not None and self.kv_cache_blocks < 2:
            errors.add(
                "kv_cache_blocks", f"must be >= 2 (one is scratch), got {self.kv_cache_blocks}"
            )
        if self.buffer_size_gb <= 0:
            errors.add("buffer_size_gb", f"must be > 0, got {self.buffer_size_gb}")
        if self.port is not None and not 0 < self.port < 65536:
            errors.add("port", f"must be a TCP port (1-65535), got {self.port}")
        if self.heartbeat_timeout_s <= 0:
            errors.add("heartbeat_timeout_s", f"must be > 0, got {self.heartbeat_timeout_s}")
        for name in ("cuda_graph_decode_sizes", "cuda_graph_prefill_tokens"):
            sizes = getattr(self, name)
            if sizes and min(sizes) < 1:
                errors.add(name, f"sizes must be >= 1, got {sizes}")

    @property
    def replica_size(self) -> int:
        """Processes of one model replica: tensor_model_parallel_size x
        pipeline_model_parallel_size."""
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    def checked(self) -> InferenceConfig:
        """Raise ``ConfigError`` naming every invalid field; returns ``self``."""
        from mcore.core import ConfigError

        errors = ConfigErrors("inference.")
        self.validate(errors)
        if errors:
            raise ConfigError(errors.messages)
        return self
