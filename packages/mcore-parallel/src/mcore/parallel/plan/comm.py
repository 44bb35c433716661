"""Communication bytes per training step of one rank, per process group.

Bytes are what one rank *sends* per step with ring algorithms over a group of ``n`` ranks:
all-reduce of ``S`` bytes ``2 (n-1)/n S``; all-gather or reduce-scatter of a full buffer of
``S`` bytes ``(n-1)/n S``; all-to-all of ``S`` bytes ``(n-1)/n S``. Per micro-batch (``M`` of
them per step), ``S_act = s/cp x b x h`` activation bytes in the compute dtype:

- **TP**: per attention and per dense MLP block, one all-reduce forward and one backward (with
  sequence parallelism an all-gather plus a reduce-scatter, the same bytes); the embedding's
  and the output layer's one each; full recompute repeats the forward ones. MoE MLPs have no TP
  collective (their tokens move over EP).
- **CP**: per attention layer the ring passes this rank's keys and values ``cp - 1`` times
  forward, and keys, values and their gradients ``cp - 1`` times backward (recompute: again).
- **EP**: per MoE layer, the ``alltoall`` dispatcher sends its ``tokens x topk`` routed rows
  out and back, forward and backward (four all-to-alls; six with full recompute); with
  ``etp > 1`` it also all-gathers and reduce-scatters them over ETP. The ``allgather``
  dispatcher gathers every token of the ``ep x etp`` replica instead. Routing is balanced.
- **PP**: hidden states ``[s/cp/tp_sp, b, h]`` forward to the next stage and their gradient
  backward, per model chunk boundary.
- **DP**: once per step: ``ddp`` all-reduces the gradient buffers over ``dp x cp`` (experts over
  ``edp``); the distributed optimizer reduce-scatters them and all-gathers the parameters;
  megatron_fsdp per strategy (``optim_grads_params`` gathers parameters for forward and
  backward and reduce-scatters gradients every micro-batch; ``optim_grads`` reduce-scatters
  every micro-batch and gathers after the step; ``optim`` once each; ``no_shard`` all-reduces).
"""

from __future__ import annotations

from typing import Any


def all_reduce(n: int, size: float) -> float:
    return 2.0 * (n - 1) / n * size if n > 1 else 0.0


def all_gather(n: int, size: float) -> float:
    """Also reduce-scatter and all-to-all: ``size`` is the full buffer."""
    return (n - 1) / n * size if n > 1 else 0.0


def step_comm(
    config: Any,
    ps: Any,
    *,
    kinds: list[tuple[bool, str | None]],
    pre_process: bool,
    post_process: bool,
    num_chunks: int,
    num_microbatches: int,
    dtype_bytes: int,
    sync: dict[str, dict[str, int]],
) -> dict[str, float]:
    """Bytes this rank sends per step, by group: ``tp``, ``cp``, ``ep``, ``pp``, ``dp``.

    ``kinds`` are the ``(has attention, mlp kind)`` of this rank's layers (all its chunks)."""
    model, train = config.model, config.train
    moe = getattr(config, "moe", None)
    b, s, h, m = train.micro_batch_size, train.seq_length // ps.cp_size, model.hidden_size, 1
    act = s * b * h * dtype_bytes
    forwards = 2 if model.recompute_granularity == "full" else 1
    tp_sp = ps.tp_size if config.parallel.sequence_parallel else 1
    blocks = sum(a for a, _ in kinds) + sum(k == "dense" for _, k in kinds)
    tp = blocks * (forwards + 1) * all_reduce(ps.tp_size, act)
    tp += (int(pre_process) + int(post_process)) * all_reduce(ps.tp_size, act)

    attention_layers = sum(a for a, _ in kinds)
    if model.multi_latent_attention:
        width = model.num_attention_heads * (
            model.qk_head_dim + model.qk_pos_emb_head_dim + model.v_head_dim
        )
    else:
        width = 2 * model.query_groups * model.head_dim
    kv = s * b * width // ps.tp_size * dtype_bytes
    cp = attention_layers * (forwards + 2) * (ps.cp_size - 1) * kv

    ep = 0.0
    moe_layers = sum(k == "moe" for _, k in kinds)
    if moe_layers and moe is not None:
        tokens = s * b // tp_sp
        if moe.token_dispatcher_type == "allgather":
            n = ps.ep_size * ps.etp_size
            gathered = n * tokens * h * dtype_bytes
            ep = moe_layers * (forwards + 1) * 2 * all_gather(n, gathered)
        else:
            rows = tokens * moe.router_topk * h * dtype_bytes
            per_layer = 2 * all_gather(ps.ep_size, rows)
            per_layer += 2 * all_gather(ps.etp_size, ps.etp_size * rows)
            ep = moe_layers * (forwards + 1) * per_layer

    boundary = s * b // tp_sp * h * dtype_bytes
    sends = 0
    if ps.pp_size > 1:  # chunk c of stage r is virtual stage c * pp + r
        last = ps.pp_size * num_chunks - 1
        for c in range(num_chunks):
            v = c * ps.pp_size + ps.pp_rank
            sends += int(v < last) + int(v > 0)
    pp = sends * boundary

    per_micro = {"tp": tp, "cp": cp, "ep": ep, "pp": pp}
    out = {k: v * num_microbatches * m for k, v in per_micro.items()}
    out["dp"] = _dp_bytes(config, ps, sync, num_microbatches)
    return out


def _dp_bytes(config: Any, ps: Any, sync: dict[str, dict[str, int]], micro: int) -> float:
    sizes = {"dp": ps.dp_cp_size, "edp": ps.edp_size}
    total = 0.0
    if config.train.data_parallel == "megatron_fsdp":
        fsdp = config.fsdp
        strategy = fsdp.data_parallel_sharding_strategy
        replicas = fsdp.num_distributed_optimizer_instances
        for key, n in sizes.items():
            grads, params = sync.get(key, {}).get("grads", 0), sync.get(key, {}).get("params", 0)
            shard_n = n // replicas
            if strategy == "no_shard":
                total += all_reduce(n, grads)
                continue
            rs, ag = all_gather(shard_n, grads), all_gather(shard_n, params)
            across = all_reduce(replicas, grads / shard_n) if replicas > 1 else 0.0
            if strategy == "optim_grads_params":
                total += micro * (rs + 2 * ag) + across
            elif strategy == "optim_grads":
                total += micro * rs + ag + across
            else:
                total += rs + ag + across
        return total
    distributed = config.optimizer.use_distributed_optimizer
    for key, n in sizes.items():
        grads, params = sync.get(key, {}).get("grads", 0), sync.get(key, {}).get("params", 0)
        if distributed:
            total += all_gather(n, grads) + all_gather(n, params)
        else:
            total += all_reduce(n, grads)
    return total
