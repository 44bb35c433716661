"""Tensor-parallel linear and embedding layers, with the collectives visible in ``forward``.

- ``ColumnParallelLinear`` splits the output features: each rank computes ``y[..., shard]``.
- ``RowParallelLinear`` splits the input features: each rank computes a partial ``y`` and the
  partials are summed.
- ``VocabParallelEmbedding`` splits the vocabulary: each rank looks up the ids it owns.

A column layer followed by a row layer (attention, MLP) needs one all-reduce forward and one
backward. With sequence parallelism activations between TP regions are split along the
sequence, ``[s / tp, b, h]``: the all-reduce becomes a reduce-scatter after the row layer and an
all-gather before the column layer, saving activation memory at the same communication cost.

Initialisation is global and deterministic without any rank drawing a full weight: built on a
real device, a layer draws one seed from torch's global generator and fills only its shard from
counter-based tiles of the full weight (:mod:`mcore.parallel.init`), so one ``torch.manual_seed``
gives the same model for every TP size; built on ``meta``, it only records its recipe for
:func:`mcore.parallel.init.materialize`. Every layer also carries what a checkpoint or Hugging Face
loader needs: ``tp_size``, ``tp_rank``, ``full_weight_shape`` and ``shard_weight(full)``
(``shard_bias(full)`` on the linear layers), which returns this rank's part of a full tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mcore.parallel.errors import ParallelLayoutError, ShardShapeError
from mcore.parallel.init import ZEROS, draw_seed, init_local, set_init
from mcore.parallel.sharding import Layout
from mcore.parallel.tensor_parallel.mappings import (
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
)
from mcore.parallel.tensor_parallel.utils import (
    InitMethod,
    divide,
    group_rank,
    group_size,
    init_method_normal,
)

ProcessGroup = torch.distributed.ProcessGroup

LinearKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
"""``kernel(x, weight, bias) -> x weightᵀ + bias``: what a linear layer's local matmul runs."""

LinearBackend = Callable[[Any], "LinearKernel | None"]
"""A ``linear_backend`` registry entry: given a parallel linear layer, the kernel it should run
(None: ``F.linear``). Called once per layer, so a backend may pick by size or kind."""


def torch_linear_backend(layer: Any) -> LinearKernel | None:
    """The ``linear_backend`` entry ``torch``: every layer runs ``F.linear``."""
    return None


def apply_linear_backend(model: torch.nn.Module, backend: LinearBackend) -> int:
    """Give every parallel linear layer of ``model`` the kernel ``backend`` chooses for it;
    returns how many got one (the others run ``F.linear``)."""
    count = 0
    for module in model.modules():
        if isinstance(module, ColumnParallelLinear | RowParallelLinear):
            module.kernel = backend(module)
            count += module.kernel is not None
    return count


def _initialized_shard(
    layout: Layout,
    init_method: InitMethod,
    *,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
) -> torch.Tensor:
    """This rank's shard of a weight (``layout`` maps it into the full one), initialised.

    On the ``meta`` device nothing is drawn: the parameter records its recipe and
    :func:`mcore.parallel.init.materialize` fills it later, by its name. Built directly on a
    real device, the layer draws a seed from torch's global generator and fills only its own
    shard, tile by tile (see :mod:`mcore.parallel.init`), so one seed gives the same full
    weight for every TP size without any rank drawing the full tensor.
    """
    dtype = dtype or torch.get_default_dtype()
    device = torch.device(device) if device is not None else torch.get_default_device()
    local = torch.empty(_local_shape(layout), dtype=dtype, device=device)
    if device.type != "meta":
        init_local(local, layout, init_method, seed=draw_seed())
    return local


def _local_shape(layout: Layout) -> tuple[int, ...]:
    """The local tensor's shape: the extent of the layout's parts."""
    dims = len(layout.global_shape)
    return tuple(max(p.local_offset[d] + p.size[d] for p in layout.parts) for d in range(dims))


def _parameter(local: torch.Tensor, init_method: InitMethod) -> nn.Parameter:
    """``local`` as a parameter that remembers its init recipe (for meta construction)."""
    return set_init(nn.Parameter(local), init_method)


def _zeros(shape: tuple[int, ...], dtype, device) -> nn.Parameter:
    return set_init(nn.Parameter(torch.zeros(shape, dtype=dtype, device=device)), ZEROS)


def _check_full_shape(layer: str, what: str, full: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(full.shape) != tuple(expected):
        raise ShardShapeError(
            f"{layer}.shard_{what} expects the full {what} of shape {tuple(expected)}, "
            f"got {tuple(full.shape)}"
        )


class ColumnParallelLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W``'s output rows (and ``b``) split over the TP group.

    The local output is ``[..., out_features / tp]`` unless ``gather_output``. With
    ``sequence_parallel`` the input is ``[s / tp, b, in]`` and is all-gathered along the
    sequence first.

    ``partitions`` names sub-blocks of the output that are split over TP *separately*, for fused
    projections: QKV with ``[q, k, v]`` keeps ``[q/tp | k/tp | v/tp]`` on each rank, SwiGLU with
    ``[gate, up]`` keeps ``[gate/tp | up/tp]``, so each rank can split its output locally.

    ``skip_weight_param_allocation`` builds no weight: ``forward`` must be given one (a tied
    output layer is passed the embedding's local shard ``[vocab / tp, h]``).
    """

    partition_dim = 0
    """The weight dimension split over TP (output features)."""

    kernel: LinearKernel | None = None
    """Runs the local matmul in place of ``F.linear`` when set (an inference engine's weights
    prepacked for its CPU GEMM); the collectives around it stay as they are."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        tp_group: ProcessGroup | None = None,
        bias: bool = True,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        init_method: InitMethod | None = None,
        partitions: Sequence[int] | None = None,
        skip_weight_param_allocation: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.tp_group = tp_group
        self.tp_size, self.tp_rank = group_size(tp_group), group_rank(tp_group)
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        self.partitions = list(partitions) if partitions is not None else [out_features]
        if sum(self.partitions) != out_features:
            raise ParallelLayoutError(
                f"ColumnParallelLinear partitions {self.partitions} sum to "
                f"{sum(self.partitions)}, but out_features is {out_features}"
            )
        self.local_partitions = [
            divide(p, self.tp_size, f"ColumnParallelLinear partition {i} of out_features")
            for i, p in enumerate(self.partitions)
        ]
        self.output_size_per_partition = sum(self.local_partitions)
        self.full_weight_shape = (out_features, in_features)

        if skip_weight_param_allocation:
            self.register_parameter("weight", None)
        else:
            init = init_method or init_method_normal()
            local_shape = (self.output_size_per_partition, in_features)
            layout = Layout.split(
                local_shape, {0: (self.tp_rank, self.tp_size, self.local_partitions)}
            )
            self.weight = _parameter(
                _initialized_shard(layout, init, dtype=dtype, device=device), init
            )
        if bias:
            self.bias = _zeros((self.output_size_per_partition,), dtype, device)
        else:
            self.register_parameter("bias", None)

    def shard_layout(self, name: str) -> Layout | None:
        """Where this rank's weight or bias rows sit in the full tensor (checkpoints): each
        partition's ``rank``-th block (see :mod:`mcore.parallel.sharding`)."""
        tensor = getattr(self, name, None) if name in ("weight", "bias") else None
        if tensor is None:
            return None
        split = (self.tp_rank, self.tp_size, self.local_partitions)
        return Layout.split(tuple(tensor.shape), {0: split})

    def _shard_rows(self, full: torch.Tensor) -> torch.Tensor:
        # Each partition is split over TP on its own, then this rank's pieces are stacked.
        blocks = full.split(self.partitions, dim=0)
        return torch.cat([b.chunk(self.tp_size, dim=0)[self.tp_rank] for b in blocks], dim=0)

    def shard_weight(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full ``[out_features, in_features]`` weight."""
        _check_full_shape("ColumnParallelLinear", "weight", full, self.full_weight_shape)
        return self._shard_rows(full)

    def shard_bias(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's entries of a full ``[out_features]`` bias."""
        _check_full_shape("ColumnParallelLinear", "bias", full, (self.out_features,))
        return self._shard_rows(full)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: ``[..., in]`` (``[s / tp, b, in]`` with sequence parallelism) →
        ``[..., out / tp]`` (``[..., out]`` with ``gather_output``)."""
        if weight is None:
            weight = self.weight
            if weight is None:
                raise ShardShapeError(
                    "ColumnParallelLinear was built with skip_weight_param_allocation=True: "
                    "pass the weight to forward(x, weight=...)"
                )
        elif tuple(weight.shape) != (self.output_size_per_partition, self.in_features):
            raise ShardShapeError(
                f"ColumnParallelLinear expects a weight of local shape "
                f"{(self.output_size_per_partition, self.in_features)} (out_features / tp, "
                f"in_features), got {tuple(weight.shape)}"
            )
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, self.tp_group)
        else:
            x = copy_to_tensor_parallel_region(x, self.tp_group)
        y = (self.kernel or F.linear)(x, weight, self.bias)
        if self.gather_output and self.tp_size > 1:
            y = gather_from_tensor_parallel_region(y, self.tp_group)
            if len(self.partitions) > 1:
                y = self._rank_order_to_partition_order(y)
        return y

    def _rank_order_to_partition_order(self, y: torch.Tensor) -> torch.Tensor:
        """``[q0 k0 v0 | q1 k1 v1]`` (gathered by rank) → ``[q0 q1 | k0 k1 | v0 v1]``."""
        by_rank = y.unflatten(-1, (self.tp_size, self.output_size_per_partition))
        blocks = by_rank.split(self.local_partitions, dim=-1)  # each [..., tp, p / tp]
        return torch.cat([b.flatten(-2) for b in blocks], dim=-1)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"tp={self.tp_rank}/{self.tp_size}, partitions={self.partitions}, "
            f"bias={self.bias is not None}, gather_output={self.gather_output}, "
            f"sequence_parallel={self.sequence_parallel}"
        )


class RowParallelLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W``'s input columns split over the TP group.

    The input is ``[..., in / tp]`` (``input_is_parallel``, the output of a column layer) or
    full ``[..., in]``, which is split here. Partial outputs are all-reduced; with
    ``sequence_parallel`` they are reduce-scattered along the sequence to ``[s / tp, b, out]``.
    The bias is replicated and added once, after the reduction.

    Under sequence parallelism each rank's bias gradient covers only its sequence chunk, so
    the bias is marked ``reduce_grad_over_tp = True``: the gradient finalizer sums marked
    parameters' gradients over the TP group after backward.
    """

    partition_dim = 1
    """The weight dimension split over TP (input features)."""

    kernel: LinearKernel | None = None
    """Runs the local matmul in place of ``F.linear`` when set (see
    ``ColumnParallelLinear.kernel``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        tp_group: ProcessGroup | None = None,
        bias: bool = True,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        init_method: InitMethod | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise ParallelLayoutError(
                "RowParallelLinear with sequence_parallel=True needs input_is_parallel=True: "
                "sequence parallelism expects the TP-split output of a column-parallel layer"
            )
        self.in_features, self.out_features = in_features, out_features
        self.tp_group = tp_group
        self.tp_size, self.tp_rank = group_size(tp_group), group_rank(tp_group)
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        self.input_size_per_partition = divide(
            in_features, self.tp_size, "RowParallelLinear in_features"
        )
        self.full_weight_shape = (out_features, in_features)
        init = init_method or init_method_normal()
        layout = Layout.split(
            (out_features, self.input_size_per_partition), {1: (self.tp_rank, self.tp_size, None)}
        )
        self.weight = _parameter(_initialized_shard(layout, init, dtype=dtype, device=device), init)
        if bias:
            self.bias = _zeros((out_features,), dtype, device)
            if sequence_parallel and self.tp_size > 1:
                self.bias.reduce_grad_over_tp = True  # pyright: ignore[reportAttributeAccessIssue]
        else:
            self.register_parameter("bias", None)

    def shard_layout(self, name: str) -> Layout | None:
        """Where this rank's weight columns sit in the full weight (the bias is replicated)."""
        if name != "weight":
            return None
        return Layout.split(tuple(self.weight.shape), {1: (self.tp_rank, self.tp_size, None)})

    def shard_weight(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's columns of a full ``[out_features, in_features]`` weight (a view)."""
        _check_full_shape("RowParallelLinear", "weight", full, self.full_weight_shape)
        return full.chunk(self.tp_size, dim=1)[self.tp_rank]

    def shard_bias(self, full: torch.Tensor) -> torch.Tensor:
        """The bias is replicated: the full ``[out_features]`` tensor itself."""
        _check_full_shape("RowParallelLinear", "bias", full, (self.out_features,))
        return full

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., in / tp]`` (or ``[..., in]`` without ``input_is_parallel``) →
        ``[..., out]`` (``[s / tp, b, out]`` with sequence parallelism)."""
        if not self.input_is_parallel:
            x = scatter_to_tensor_parallel_region(x, self.tp_group)
        y = (self.kernel or F.linear)(x, self.weight, None)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y, self.tp_group)
        else:
            y = reduce_from_tensor_parallel_region(y, self.tp_group)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"tp={self.tp_rank}/{self.tp_size}, bias={self.bias is not None}, "
            f"input_is_parallel={self.input_is_parallel}, "
            f"sequence_parallel={self.sequence_parallel}"
        )


class VocabParallelEmbedding(nn.Module):
    """An embedding table with its rows (the vocabulary) split over the TP group.

    Rank ``r`` owns ids ``[vocab_start_index, vocab_end_index)``; it looks those up, writes
    zeros for the others, and the partial embeddings are all-reduced. With
    ``sequence_parallel`` they are reduce-scattered along dimension 0 instead, so pass
    sequence-first ids ``[s, b]`` and get ``[s / tp, b, h]``. Ids may have any shape otherwise.
    """

    partition_dim = 0
    """The weight dimension split over TP (the vocabulary)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        tp_group: ProcessGroup | None = None,
        init_method: InitMethod | None = None,
        sequence_parallel: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.tp_group = tp_group
        self.tp_size, self.tp_rank = group_size(tp_group), group_rank(tp_group)
        self.sequence_parallel = sequence_parallel
        self.num_embeddings_per_partition = divide(
            num_embeddings,
            self.tp_size,
            "VocabParallelEmbedding num_embeddings (pad the vocabulary to a multiple of it)",
        )
        self.vocab_start_index = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        self.full_weight_shape = (num_embeddings, embedding_dim)
        init = init_method or init_method_normal()
        layout = Layout.split(
            (self.num_embeddings_per_partition, embedding_dim),
            {0: (self.tp_rank, self.tp_size, None)},
        )
        self.weight = _parameter(_initialized_shard(layout, init, dtype=dtype, device=device), init)

    def shard_layout(self, name: str) -> Layout | None:
        """Where this rank's vocabulary rows sit in the full embedding table."""
        if name != "weight":
            return None
        return Layout.split(tuple(self.weight.shape), {0: (self.tp_rank, self.tp_size, None)})

    def shard_weight(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full ``[num_embeddings, embedding_dim]`` table (a view)."""
        _check_full_shape("VocabParallelEmbedding", "weight", full, self.full_weight_shape)
        return full[self.vocab_start_index : self.vocab_end_index]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids``: global token ids of any shape → ``[*ids.shape, h]`` (with sequence
        parallelism: ids ``[s, b]`` → ``[s / tp, b, h]``)."""
        if self.tp_size > 1:
            outside = (ids < self.vocab_start_index) | (ids >= self.vocab_end_index)
            local_ids = (ids - self.vocab_start_index).masked_fill(outside, 0)
            out = F.embedding(local_ids, self.weight)
            # Zero rows this rank does not own; masked_fill also stops their gradient.
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        else:
            out = F.embedding(ids, self.weight)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(out, self.tp_group)
        return reduce_from_tensor_parallel_region(out, self.tp_group)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, tp={self.tp_rank}/{self.tp_size}, "
            f"vocab=[{self.vocab_start_index}, {self.vocab_end_index}), "
            f"sequence_parallel={self.sequence_parallel}"
        )
