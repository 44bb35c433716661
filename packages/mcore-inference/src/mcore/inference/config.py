"""The ``[inference]`` config section: engine capacity and the server's address."""

from __future__ import annotations

from dataclasses import dataclass

from mcore.core import ConfigErrors


@dataclass(kw_only=True)
class InferenceConfig:
    """Inference engine and server."""

    max_requests: int = 64
    """Requests in flight at once."""
    max_tokens: int | None = None
    """Tokens per engine step (prefill chunks and decodes together); unset means no cap."""
    max_sequence_length: int = 4096
    """Longest prompt plus completion."""
    block_size_tokens: int = 256
    """Tokens per paged KV-cache block."""
    buffer_size_gb: float = 4.0
    """Memory reserved for the KV cache."""
    enable_cuda_graph: bool = False
    """Capture CUDA graphs for the decode step (GPU only)."""
    host: str = "127.0.0.1"
    """Address the HTTP server binds to."""
    port: int | None = None
    """Port of the HTTP server; unset picks a free one."""
    api_key: str | None = None
    """Require this bearer token on every request."""

    def validate(self, errors: ConfigErrors) -> None:
        for name in ("max_requests", "max_tokens", "max_sequence_length", "block_size_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                errors.add(name, f"must be >= 1, got {value}")
        if self.buffer_size_gb <= 0:
            errors.add("buffer_size_gb", f"must be > 0, got {self.buffer_size_gb}")
        if self.port is not None and not 0 < self.port < 65536:
            errors.add("port", f"must be a TCP port (1-65535), got {self.port}")
