"""mcore.ckpt: sharded checkpoints that reshard on load, with formats as plugins."""

SUPPORTED_FORMATS = ("torch_dist", "fsdp_dtensor", "hf")

__all__ = ["SUPPORTED_FORMATS"]
