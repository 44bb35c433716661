"""The plan as text: a memory table and a communication table, one row per pipeline stage."""

from __future__ import annotations

from mcore.parallel.plan.planner import GiB, Plan


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    return [line(header), line(["-" * w for w in widths]), *map(line, rows)]


def _stage(role) -> str:
    ends = ("first" if role.first_stage else "") + (
        "+last" if role.last_stage and role.first_stage else "last" if role.last_stage else ""
    )
    return f"{role.pp_rank}" + (f" ({ends})" if ends else "")


def _layers(layers: list[int]) -> str:
    if not layers:
        return "-"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
    return ",".join(map(str, layers))


def render(plan: Plan) -> str:
    """A readable report of ``plan`` (sizes in GiB, FLOPs in TFLOP)."""
    lay = plan.layout
    sizes = " ".join(f"{k}={lay[k]}" for k in ("tp", "pp", "vpp", "cp", "dp", "ep", "etp", "edp"))
    out = [
        f"world size {plan.world_size}: {sizes}; {plan.num_microbatches} micro-batches per step",
        f"model FLOPs: {plan.model_flops_per_token / 1e9:.2f} GFLOP per token, "
        f"{plan.model_flops_per_step / 1e15:.2f} PFLOP per step",
        "",
        "memory per rank (GiB)",
    ]
    header = [
        "stage", "layers", "params", "weights", "grads", "optim", "optim cpu", "act/mb",
        "in-flight", "act", "total", f"fits {plan.gpu_memory_gb:g} GB",
    ]  # fmt: skip
    rows = [
        [
            _stage(r),
            _layers(r.layers),
            f"{r.num_params / 1e9:.3f}B",
            _gib(r.params_bytes + r.transient_model_bytes),
            _gib(r.grads_bytes),
            _gib(r.optimizer_bytes),
            _gib(r.optimizer_cpu_bytes),
            _gib(r.activation_bytes_per_microbatch),
            str(r.in_flight_microbatches),
            _gib(r.activation_bytes),
            _gib(r.total_bytes),
            "yes" if r.fits else "NO",
        ]
        for r in plan.roles
    ]
    if any(r.frozen_bytes for r in plan.roles):  # a frozen teacher's weights, beside weights
        header.insert(3, "frozen")
        for row, r in zip(rows, plan.roles, strict=True):
            row.insert(3, _gib(r.frozen_bytes))
    out += _table(header, rows)
    out += ["", "communication per rank per step (GiB sent) and compute (TFLOP)"]
    header = ["stage", "TP", "CP", "EP", "PP", "DP", "TFLOP"]
    rows = [
        [_stage(r)]
        + [_gib(r.comm_bytes_per_step[g]) for g in ("tp", "cp", "ep", "pp", "dp")]
        + [f"{r.flops_per_step / 1e12:.1f}"]
        for r in plan.roles
    ]
    out += _table(header, rows)
    out += ["", "assumptions: " + "; ".join(plan.assumptions)]
    out.append(f"fits: {'yes' if plan.fits else 'NO'} (planned in {plan.elapsed_s:.1f} s)")
    return "\n".join(out)
