"""``ParallelState``: the parallel layout of a run and every process group it needs.

One object names the layout and builds the device meshes once; layers and wrappers are handed
the groups they need (``state.tp_group``, ``state.dp_cp_group``, ...) instead of reading
globals. Two meshes cover the same ranks:

- dense ``("pp", "dp", "cp", "tp")``, row-major, so TP neighbours are adjacent ranks (as in
  Megatron: the TP group should sit inside a node, where the links are fastest);
- expert ``("pp", "edp", "ep", "etp")``, the MoE layout: experts split over EP, each expert's
  weights over ETP, and expert gradients reduced over EDP.

Without torch.distributed and with every size 1 the state is single-process: sizes 1, ranks 0
and every group ``None``, which layers read as "no communication".
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, cast

import torch
import torch.distributed as dist

from mcore.parallel.errors import DistributedNotInitializedError, ParallelLayoutError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh

    from mcore.parallel.config import ParallelConfig

DENSE_DIMS = ("pp", "dp", "cp", "tp")
"""Dense mesh dimensions, outermost first (TP varies fastest across ranks)."""
EXPERT_DIMS = ("pp", "edp", "ep", "etp")
"""Expert mesh dimensions, outermost first (ETP varies fastest across ranks)."""

# The config field behind each size, so messages name the knob a user sets.
_FIELD = {
    "tp": "tensor_model_parallel_size",
    "pp": "pipeline_model_parallel_size",
    "cp": "context_parallel_size",
    "ep": "expert_model_parallel_size",
    "etp": "expert_tensor_parallel_size",
}

_TIMES = "\u00d7"  # the multiplication sign, spelled out so linters do not take it for an x

# ParallelConfig.distributed_backend -> the mesh's device type (None: ask the default group).
_DEVICE_OF_BACKEND = {"auto": None, "nccl": "cuda", "gloo": "cpu"}


class ParallelState:
    """Process groups of a ``pp * dp * cp * tp`` layout (plus ``pp * edp * ep * etp`` for experts).

    ``dp`` is derived: ``world_size / (tp * pp * cp)``; ``etp`` defaults to ``tp`` and
    ``edp = world_size / (pp * ep * etp)``. For each dimension ``X`` in ``tp, pp, dp, cp, ep,
    etp, edp`` (and ``dp_cp``, the gradient-reduction group spanning data and context parallel
    ranks, and ``ep_etp``, the expert ranks of one expert-data-parallel replica) the state has
    ``X_size``, ``X_rank`` (this rank's index in its ``X`` group) and
    ``X_group`` (a ``ProcessGroup``, or ``None`` in a single-process state).

    All ranks must construct the same layout at the same time: building the meshes is a
    collective over the world.
    """

    world_size: int
    rank: int
    mesh: DeviceMesh | None
    """The dense ``("pp", "dp", "cp", "tp")`` mesh; ``None`` in a single-process state."""
    expert_mesh: DeviceMesh | None
    """The expert ``("pp", "edp", "ep", "etp")`` mesh; ``None`` in a single-process state."""

    tp_size: int
    tp_rank: int
    tp_group: ProcessGroup | None
    pp_size: int
    pp_rank: int
    pp_group: ProcessGroup | None
    dp_size: int
    dp_rank: int
    dp_group: ProcessGroup | None
    cp_size: int
    cp_rank: int
    cp_group: ProcessGroup | None
    dp_cp_size: int
    dp_cp_rank: int
    dp_cp_group: ProcessGroup | None
    ep_size: int
    ep_rank: int
    ep_group: ProcessGroup | None
    etp_size: int
    etp_rank: int
    etp_group: ProcessGroup | None
    edp_size: int
    edp_rank: int
    edp_group: ProcessGroup | None
    ep_etp_size: int
    ep_etp_rank: int
    ep_etp_group: ProcessGroup | None

    def __init__(
        self,
        *,
        tp: int = 1,
        pp: int = 1,
        cp: int = 1,
        ep: int = 1,
        etp: int | None = None,
        device_type: str | None = None,
    ) -> None:
        etp = tp if etp is None else etp
        sizes = {"tp": tp, "pp": pp, "cp": cp, "ep": ep, "etp": etp}
        for dim, size in sizes.items():
            if not isinstance(size, int) or size < 1:
                raise ParallelLayoutError(f"{_FIELD[dim]} must be an integer >= 1, got {size!r}")

        initialized = dist.is_available() and dist.is_initialized()
        if not initialized:
            wanted = {dim: size for dim, size in sizes.items() if size > 1}
            if wanted:
                shown = ", ".join(f"{_FIELD[d]}={s}" for d, s in wanted.items())
                raise DistributedNotInitializedError(
                    f"a parallel layout with {shown} needs torch.distributed, which is not "
                    "initialized: call torch.distributed.init_process_group() before building "
                    "ParallelState, or launch the job with torchrun (tests: "
                    "mcore.core.testing.run_ranks)"
                )
            self._init_single_process()
            return

        world = dist.get_world_size()
        dp = _quotient(world, {"tp": tp, "pp": pp, "cp": cp})
        edp = _quotient(world, {"pp": pp, "ep": ep, "etp": etp})
        if device_type is None:
            # A backend string may list several ("cpu:gloo,cuda:nccl"); NCCL means CUDA tensors.
            device_type = "cuda" if "nccl" in str(dist.get_backend()) else "cpu"
        self._init_meshes(device_type, world, tp=tp, pp=pp, cp=cp, dp=dp, ep=ep, etp=etp, edp=edp)

    @classmethod
    def from_config(cls, cfg: ParallelConfig) -> ParallelState:
        """The state of a ``[parallel]`` config section (``distributed_backend`` picks the
        mesh's device type: ``nccl`` → cuda, ``gloo`` → cpu, ``auto`` → the default group's)."""
        state = cls(
            tp=cfg.tensor_model_parallel_size,
            pp=cfg.pipeline_model_parallel_size,
            cp=cfg.context_parallel_size,
            ep=cfg.expert_model_parallel_size,
            etp=cfg.expert_tensor_parallel_size,
            device_type=_DEVICE_OF_BACKEND[cfg.distributed_backend],
        )
        if cfg.data_parallel_size is not None and cfg.data_parallel_size != state.dp_size:
            raise ParallelLayoutError(
                f"data_parallel_size is {cfg.data_parallel_size}, but world size "
                f"{state.world_size} / (tensor_model_parallel_size {state.tp_size} {_TIMES} "
                f"pipeline_model_parallel_size {state.pp_size} {_TIMES} context_parallel_size "
                f"{state.cp_size}) gives {state.dp_size}; leave it unset to derive it"
            )
        return state

    def _init_single_process(self) -> None:
        self.world_size, self.rank = 1, 0
        self.mesh = self.expert_mesh = None
        for dim in ("tp", "pp", "dp", "cp", "dp_cp", "ep", "etp", "edp", "ep_etp"):
            self._set_dim(dim, 1, 0, None)

    def _init_meshes(self, device_type: str, world: int, **sizes: int) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        self.world_size, self.rank = world, dist.get_rank()
        self.mesh = init_device_mesh(
            device_type, tuple(sizes[d] for d in DENSE_DIMS), mesh_dim_names=DENSE_DIMS
        )
        self.expert_mesh = init_device_mesh(
            device_type, tuple(sizes[d] for d in EXPERT_DIMS), mesh_dim_names=EXPERT_DIMS
        )
        for dim in DENSE_DIMS:
            self._set_dim(dim, sizes[dim], self.mesh.get_local_rank(dim), self.mesh.get_group(dim))
        expert = self.expert_mesh
        for dim in ("edp", "ep", "etp"):  # pp is shared: the same groups as the dense mesh's
            self._set_dim(dim, sizes[dim], expert.get_local_rank(dim), expert.get_group(dim))
        # dp_cp: for each (pp, tp) coordinate, the dp * cp ranks under it. Built with a public
        # call rather than by slicing and flattening the mesh, which is private API and imports
        # torch._dynamo (seconds per process, paid again by every forked test rank).
        pp, dp, cp, tp = (sizes[d] for d in DENSE_DIMS)
        layout = torch.arange(world).view(pp, dp, cp, tp)  # init_device_mesh's rank order
        members = layout.permute(0, 3, 1, 2).reshape(pp * tp, dp * cp).tolist()
        dp_cp_group, _ = dist.new_subgroups_by_enumeration(members, group_desc="dp_cp")
        (mine,) = [m for m in members if self.rank in m]
        # Every rank is in one of the groups: it gets a group, never the non-member value.
        self._set_dim("dp_cp", dp * cp, mine.index(self.rank), cast("ProcessGroup", dp_cp_group))
        # ep_etp: the ranks that hold the different experts and expert shards of one replica,
        # over which the allgather dispatcher gathers tokens.
        edp, ep, etp = (sizes[d] for d in ("edp", "ep", "etp"))
        members = torch.arange(world).view(pp * edp, ep * etp).tolist()
        ep_etp_group, _ = dist.new_subgroups_by_enumeration(members, group_desc="ep_etp")
        (mine,) = [m for m in members if self.rank in m]
        self._set_dim("ep_etp", ep * etp, mine.index(self.rank), cast("ProcessGroup", ep_etp_group))

    def _set_dim(self, dim: str, size: int, rank: int, group: ProcessGroup | None) -> None:
        setattr(self, f"{dim}_size", size)
        setattr(self, f"{dim}_rank", rank)
        setattr(self, f"{dim}_group", group)

    @property
    def is_first_pp_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_pp_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def check_divisible(
        self,
        *,
        num_attention_heads: int | None = None,
        num_query_groups: int | None = None,
        vocab_size: int | None = None,
        num_experts: int | None = None,
    ) -> None:
        """Raise if a model dimension does not split evenly over its parallel group.

        Heads, query groups and the vocabulary split over TP; experts over EP. Model
        constructors call this so a bad layout fails at build time with the field named.
        """
        checks: list[tuple[str, int | None, str, int, str]] = [
            ("num_attention_heads", num_attention_heads, "tp", self.tp_size, ""),
            ("num_query_groups", num_query_groups, "tp", self.tp_size, ""),
            (
                "vocab_size",
                vocab_size,
                "tp",
                self.tp_size,
                " (pad the vocabulary to a multiple of it)",
            ),
            ("num_experts", num_experts, "ep", self.ep_size, ""),
        ]
        problems = [
            f"{field} ({value}) is not divisible by {_FIELD[dim]} ({size}){hint}"
            for field, value, dim, size, hint in checks
            if value is not None and value % size != 0
        ]
        if problems:
            raise ParallelLayoutError("; ".join(problems))

    def __repr__(self) -> str:
        dims = ", ".join(
            f"{d}={getattr(self, f'{d}_size')}"
            for d in ("tp", "pp", "dp", "cp", "ep", "etp", "edp")
        )
        return f"ParallelState(world_size={self.world_size}, rank={self.rank}, {dims})"


def _quotient(world: int, factors: dict[str, int]) -> int:
    """``world / prod(factors)``, or an error naming every factor when it does not divide."""
    product = math.prod(factors.values())
    if world % product != 0:
        terms = f" {_TIMES} ".join(f"{_FIELD[d]} ({s})" for d, s in factors.items())
        raise ParallelLayoutError(f"world size {world} is not divisible by {terms} = {product}")
    return world // product
