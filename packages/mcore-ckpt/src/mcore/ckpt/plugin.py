"""mcore-ckpt's plugin: checks the checkpoint section (formats register here as they land)."""

from __future__ import annotations

from mcore.core import Config, ConfigErrors, hookimpl

# Formats Megatron-LM once offered that mcore does not carry, with what to use instead.
RETIRED_FORMATS = {
    "zarr": "torch_dist",
    "torch": "torch_dist",
}


@hookimpl
def mcore_validate_config(config: Config, errors: ConfigErrors) -> None:
    fmt = config.checkpoint.ckpt_format
    if fmt in RETIRED_FORMATS:
        errors.add(
            "checkpoint.ckpt_format",
            f"{fmt!r} is not supported; use {RETIRED_FORMATS[fmt]!r} (sharded, resharding on load)",
        )
