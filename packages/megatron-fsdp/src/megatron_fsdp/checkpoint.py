"""Checkpoints in the ``fsdp_dtensor`` format: ``torch.distributed.checkpoint`` over DTensors.

A checkpoint is a DCP directory holding ``{"model": ..., "optimizer": ...}``, where the model
entries are the sharded ``DTensor`` parameters under their ordinary names and the optimizer
entries are the optimizer state keyed by those names (DCP's ``get_state_dict`` flattening).
Each rank writes only its shards together with their global shapes and offsets, so a checkpoint
saved on N ranks loads on M ranks, and with any sharding strategy or mesh: DCP reads the pieces
that overlap the loading rank's shards.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict


def sharded_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """``{"model": ..., "optimizer": ...}`` of DTensor shards, ready for ``dcp.save``/``load``."""
    if optimizer is None:
        return {"model": model.state_dict()}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd}


def save_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Write ``model`` (and ``optimizer``) to the DCP directory ``path``; every rank calls it."""
    dcp.save(sharded_state_dict(model, optimizer), checkpoint_id=path)


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Load a checkpoint written by :func:`save_checkpoint` at any world size, in place.

    A checkpoint that stores optimizer state but no ``param_groups`` (frameworks that keep
    hyperparameters in their own config, such as mcore's ``fsdp_dtensor`` format) loads the
    state tensors and keeps this optimizer's hyperparameters.
    """
    state = sharded_state_dict(model, optimizer)
    groups = None
    if optimizer is not None:
        stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        if not any(k.startswith("optimizer.param_groups") for k in stored):
            groups = state["optimizer"].pop("param_groups")
    dcp.load(state, checkpoint_id=path)
    if groups is not None:
        state["optimizer"]["param_groups"] = groups
    if optimizer is None:
        model.load_state_dict(state["model"])
    else:
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
        )
