"""``make_plan``: per-rank memory, communication and FLOPs of a run at a world size, without
launching it.

Every pipeline stage is built for real, on ``meta`` tensors, by the rank at that stage with all
other coordinates 0, inside a fake world of ``world_size`` ranks (:mod:`.stage`); its parameter
memory comes from the wrappers' layout rules (:mod:`.memory`) and its activations from running
one micro-batch forward and backward (:mod:`.activations`). Stages built alike are measured once.
Within a stage, every data-, context-, tensor- and expert-parallel rank holds the same amount:
expert ranks hold ``num_experts / ep`` experts each and, with balanced routing, receive the same
number of tokens.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mcore.core import McoreError
from mcore.parallel.errors import ParallelLayoutError
from mcore.parallel.pipeline.layout import stage_layers
from mcore.parallel.plan.activations import measure_chunk
from mcore.parallel.plan.comm import step_comm
from mcore.parallel.plan.flops import (
    head_flops,
    layer_flops,
    layer_kinds,
    model_flops_per_token,
    mtp_blocks,
    mtp_flops,
)
from mcore.parallel.plan.memory import compute_dtype, model_state
from mcore.parallel.plan.stage import build_stage, fake_world, stage_rank
from mcore.parallel.state import _FIELD, _TIMES, _quotient
from mcore.parallel.training import build_meta_chunks

GiB = 2**30

ASSUMPTIONS = [
    "routing is balanced: every expert receives tokens * topk / num_experts tokens",
    "activations are measured on meta tensors; causal attention keeps what flash attention keeps",
    "communication is bytes sent per rank per step with ring collectives",
    "the Adam step counters, the CUDA context and allocator fragmentation are not counted",
]


@dataclass
class Role:
    """One pipeline stage's ranks: what each holds and sends."""

    pp_rank: int
    first_stage: bool
    last_stage: bool
    layers: list[int]
    num_params: int
    expert_params: int
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    optimizer_cpu_bytes: int
    transient_model_bytes: int
    frozen_bytes: int
    """Weights of frozen models beside the trained one (a distillation teacher's stage)."""
    activation_bytes_per_microbatch: int
    activation_peak_extra_bytes: int
    in_flight_microbatches: int
    activation_bytes: int
    total_bytes: int
    fits: bool
    comm_bytes_per_step: dict[str, float]
    flops_per_step: float


@dataclass
class Plan:
    world_size: int
    layout: dict[str, int]
    num_microbatches: int
    gpu_memory_gb: float
    model_flops_per_token: float
    model_flops_per_step: float
    roles: list[Role]
    fits: bool
    assumptions: list[str] = field(default_factory=lambda: list(ASSUMPTIONS))
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stage_ends(model: Any, pp: int) -> dict[str, Any]:
    """``stage_layers``' stage counts from the model config: the end stages' counts, or every
    stage's from a layer pattern's ``|`` segments."""
    return {
        "first_stage_layers": model.num_layers_in_first_pipeline_stage,
        "last_stage_layers": model.num_layers_in_last_pipeline_stage,
        "stage_counts": getattr(model, "pipeline_stage_layer_counts", None) if pp > 1 else None,
    }


def check_layout(config: Any, world_size: int) -> dict[str, int]:
    """The layout's sizes, or the errors ``mcore train`` would raise for it, before any work."""
    par, model = config.parallel, config.model
    tp, pp, cp = (
        par.tensor_model_parallel_size,
        par.pipeline_model_parallel_size,
        par.context_parallel_size,
    )
    ep = par.expert_model_parallel_size
    etp = par.expert_tensor_parallel_size or tp
    if world_size < 1:
        raise ParallelLayoutError(f"--world-size must be >= 1, got {world_size}")
    dp = _quotient(world_size, {"tp": tp, "pp": pp, "cp": cp})
    edp = _quotient(world_size, {"pp": pp, "ep": ep, "etp": etp})
    if par.data_parallel_size is not None and par.data_parallel_size != dp:
        raise ParallelLayoutError(
            f"data_parallel_size is {par.data_parallel_size}, but world size {world_size} / "
            f"({_FIELD['tp']} {tp} {_TIMES} {_FIELD['pp']} {pp} {_TIMES} {_FIELD['cp']} {cp}) "
            f"gives {dp}; leave it unset to derive it"
        )
    vpp = par.virtual_pipeline_model_parallel_size or 1
    stage_layers(model.num_layers, pp_size=pp, pp_rank=0, vp_size=vpp, **_stage_ends(model, pp))
    if model.vocab_size is None:
        raise McoreError(
            "model.vocab_size: mcore plan builds no tokenizer; set the (padded) vocabulary size"
        )
    if model.vocab_size % tp:
        raise ParallelLayoutError(
            f"vocab_size ({model.vocab_size}) is not divisible by {_FIELD['tp']} ({tp}) (pad the "
            "vocabulary to a multiple of it)"
        )
    train = config.train
    mbs = train.micro_batch_size
    gbs = train.global_batch_size or mbs * dp
    if gbs % (mbs * dp):
        raise McoreError(
            f"train.global_batch_size ({gbs}) must be a multiple of micro_batch_size ({mbs}) "
            f"x data-parallel size ({dp})"
        )
    return {"tp": tp, "pp": pp, "cp": cp, "dp": dp, "ep": ep, "etp": etp, "edp": edp, "vpp": vpp}


def in_flight(pp: int, pp_rank: int, vpp: int, num_microbatches: int) -> int:
    """Micro-batches (model-chunk micro-batches when interleaved) whose activations a stage
    holds at once: the schedule's warm-up forwards plus the one in its steady state."""
    if pp == 1:
        return 1
    if vpp == 1:
        return min(pp - pp_rank, num_microbatches)
    total = num_microbatches * vpp
    return min((pp - pp_rank - 1) * 2 + (vpp - 1) * pp + 1, total)


def make_plan(
    config: Any, world_size: int, *, gpu_memory_gb: float = 80.0, registries: Any = None
) -> Plan:
    """The plan of ``config`` (a run ``Config``) at ``world_size`` ranks."""
    started = time.perf_counter()
    layout = check_layout(config, world_size)
    from mcore.core.plugins import get_plugin_manager

    manager = get_plugin_manager()
    if registries is None:
        registries = manager.registries
    frozen = [
        spec
        for specs in manager.hook.mcore_plan_frozen_models(config=config)
        for spec in specs or []
    ]
    model, train = config.model, config.train
    moe = getattr(config, "moe", None)
    ssm = getattr(config, "ssm", None)
    mbs, seq = train.micro_batch_size, train.seq_length
    gbs = train.global_batch_size or mbs * layout["dp"]
    micro = gbs // (mbs * layout["dp"])
    dtype = compute_dtype(config) or torch.float32
    per_layer = layer_flops(model, moe, seq, ssm)
    kinds = layer_kinds(model, moe)
    mtp_kinds = [kind for block in mtp_blocks(model, moe) for kind, _ in block]
    per_token = model_flops_per_token(model, moe, seq, ssm)
    pp, vpp = layout["pp"], layout["vpp"]
    ends = _stage_ends(model, pp)
    measured: dict[Any, list] = {}
    roles = []
    for s in range(pp):
        with fake_world(stage_rank(config.parallel, world_size, s), world_size):
            stage = build_stage(config, model, registries)
            ps, chunks = stage.parallel_state, [c.to(device="meta") for c in stage.chunks]
            layer_ids = [
                i
                for c in range(vpp)
                for i in stage_layers(
                    model.num_layers, pp_size=pp, pp_rank=s, vp_size=vpp, vp_stage=c, **ends
                )
            ]
            key = _signature(chunks, [kinds[i] for i in layer_ids])
            state = model_state(chunks, ps, config)
            frozen_bytes = sum(
                _frozen_bytes(run, frozen_model, registries, ps, dtype_)
                for _, run, frozen_model, dtype_ in frozen
            )
            if key not in measured:
                measured[key] = [
                    measure_chunk(
                        c.to(dtype=dtype),
                        micro_batch_size=mbs,
                        seq_length=seq,
                        hidden_size=model.hidden_size,
                        dtype=dtype,
                        sequence_parallel_tp=ps.tp_size if config.parallel.sequence_parallel else 1,
                        cp=ps.cp_size,
                    )
                    for c in chunks
                ]
            figures = measured[key]
            comm = step_comm(
                config,
                ps,
                kinds=[kinds[i] for i in layer_ids] + (mtp_kinds if s == pp - 1 else []),
                pre_process=ps.is_first_pp_stage,
                post_process=ps.is_last_pp_stage,
                num_chunks=len(chunks),
                num_microbatches=micro,
                dtype_bytes=dtype.itemsize,
                sync=state.sync or {},
            )
        kept = max(f.kept for f in figures)
        extra = max(f.peak - f.kept for f in figures)
        flying = in_flight(pp, s, vpp, micro)
        stage_flops = sum(per_layer[i] for i in layer_ids)
        if s == pp - 1:
            stage_flops += head_flops(model) + mtp_flops(model, moe, seq, ssm)
        replicas = layout["dp"] * layout["tp"] * layout["cp"]
        total = (
            state.params
            + state.grads
            + state.optimizer
            + state.transient
            + frozen_bytes
            + flying * kept
            + extra
        )
        roles.append(
            Role(
                pp_rank=s,
                first_stage=s == 0,
                last_stage=s == pp - 1,
                layers=layer_ids,
                num_params=state.num_params,
                expert_params=state.expert_params,
                params_bytes=state.params,
                grads_bytes=state.grads,
                optimizer_bytes=state.optimizer,
                optimizer_cpu_bytes=state.optimizer_cpu,
                transient_model_bytes=state.transient,
                frozen_bytes=frozen_bytes,
                activation_bytes_per_microbatch=kept,
                activation_peak_extra_bytes=extra,
                in_flight_microbatches=flying,
                activation_bytes=flying * kept + extra,
                total_bytes=total,
                fits=total <= gpu_memory_gb * GiB,
                comm_bytes_per_step=comm,
                flops_per_step=stage_flops * gbs * seq / replicas,
            )
        )
    return Plan(
        world_size=world_size,
        layout=layout,
        num_microbatches=micro,
        gpu_memory_gb=gpu_memory_gb,
        model_flops_per_token=per_token,
        model_flops_per_step=per_token * gbs * seq,
        roles=roles,
        fits=all(r.fits for r in roles),
        elapsed_s=time.perf_counter() - started,
    )


def _frozen_bytes(
    config: Any, model_config: Any, registries: Any, ps: Any, dtype: torch.dtype
) -> int:
    """Bytes of this rank's stage of a frozen model, built on ``meta`` in the run's layout."""
    chunks = build_meta_chunks(config, model_config, registries, ps)
    return sum(p.numel() for c in chunks for p in c.parameters()) * dtype.itemsize


def _signature(chunks: list[torch.nn.Module], kinds: list) -> Any:
    """Stages with equal signatures build alike: same parameters (up to layer numbers), same
    embedding/output ownership, same layer kinds."""
    params = tuple(
        (re.sub(r"layers\.\d+", "layers", n), tuple(p.shape), p.dtype)
        for c in chunks
        for n, p in c.named_parameters()
    )
    ends = tuple(
        (getattr(c, "pre_process", None), getattr(c, "post_process", None)) for c in chunks
    )
    return params, ends, tuple(kinds), math.prod(len(list(c.parameters())) for c in chunks)
