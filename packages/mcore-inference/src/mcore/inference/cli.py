"""``mcore generate`` and ``mcore serve``.

``--model PATH`` is a Hugging Face model directory or an mcore checkpoint, told apart by
:func:`mcore.inference.loading.detect_model_kind`. Engine knobs are the ``[inference]`` section's
fields (``--inference.max-requests 32``, ``--inference.block-size-tokens 64``, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from mcore.core import CliCommand, McoreError, get_plugin_manager
from mcore.core.config import add_config_arguments, load_config, overrides_from_args
from mcore.inference.config import InferenceConfig


def _inference_arguments(parser: argparse.ArgumentParser) -> None:
    owners = {
        c.name: c.plugin for c in get_plugin_manager().registries["config_section"].components()
    }
    add_config_arguments(parser, {"inference": InferenceConfig}, owners)


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help="a Hugging Face model directory (config.json, *.safetensors, tokenizer files) or "
        "an mcore checkpoint directory (what mcore train saves)",
    )
    parser.add_argument(
        "--run-config",
        metavar="FILE",
        default=None,
        help="the run config of an mcore checkpoint that has no config.toml",
    )


def _inference_config(args: argparse.Namespace, **shortcuts: Any) -> InferenceConfig:
    overrides = {k: v for k, v in overrides_from_args(args).items() if k.startswith("inference.")}
    config = load_config(overrides=overrides).inference
    changes = {k: v for k, v in shortcuts.items() if v is not None}
    if changes:
        import dataclasses

        config = dataclasses.replace(config, **changes).checked()
    return config


# -- generate --------------------------------------------------------------------------------


def _generate_configure(parser: argparse.ArgumentParser) -> None:
    _model_arguments(parser)
    parser.add_argument(
        "--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)"
    )
    parser.add_argument(
        "--prompt-ids",
        action="append",
        default=[],
        metavar="IDS",
        help="a prompt as comma-separated token ids (repeatable; for models without a tokenizer)",
    )
    parser.add_argument("--chat", action="store_true", help="send each prompt as a user message")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (64)")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)"
    )
    parser.add_argument("--top-k", type=int, default=0, help="top-k filter (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="top-p filter (1: off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="min-p filter (0: off)")
    parser.add_argument("--seed", type=int, default=None, help="seed of each request's sampling")
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per prompt (ids, logprobs)"
    )
    _inference_arguments(parser)


def _generate_run(args: argparse.Namespace) -> int:
    from mcore.inference.engine import DynamicInferenceEngine
    from mcore.inference.loading import check_layout, load_model
    from mcore.inference.sampling import SamplingParams
    from mcore.inference.tokenizer import encode_chat

    if not args.prompt and not args.prompt_ids:
        raise McoreError("mcore generate needs --prompt TEXT (or --prompt-ids 1,2,3)")
    config = _inference_config(args)
    world = config.replica_size * config.data_parallel_size
    if world > 1 and "WORLD_SIZE" not in os.environ:
        tp, pp = config.tensor_model_parallel_size, config.pipeline_model_parallel_size
        ep = config.expert_model_parallel_size
        check_layout(args.model, tp=tp, pp=pp, ep=ep, config_file=args.run_config)
        from mcore.core.training.cli import launch_local_ranks

        return launch_local_ranks("generate", world, args.command_argv)
    parallel_state, config = _join_generate_world(config)
    model, tokenizer = load_model(
        args.model, config_file=args.run_config, parallel_state=parallel_state
    )
    prompts: list[Any] = []
    for text in args.prompt:
        if tokenizer is None:
            raise McoreError(
                f"{args.model!r} has no tokenizer (tokenizer.json); pass --prompt-ids instead"
            )
        if args.chat:
            prompts.append(encode_chat(tokenizer, [{"role": "user", "content": text}]))
        else:
            prompts.append(tokenizer.encode(text))
    for ids in args.prompt_ids:
        try:
            prompts.append([int(t) for t in ids.split(",") if t.strip()])
        except ValueError:
            raise McoreError(f"--prompt-ids {ids!r}: expected comma-separated integers") from None
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
        logprobs=0 if args.json else None,
    )
    if config.expert_model_parallel_size > 1:
        from mcore.inference.expert_parallel import ExpertParallelEngine

        engine = ExpertParallelEngine(model, config, tokenizer=tokenizer)
    else:
        engine = DynamicInferenceEngine(model, config, tokenizer=tokenizer)
    outputs = _generate_on_replicas(engine, prompts, params, parallel_state)
    if outputs is None:  # not the first rank: it printed nothing
        return 0
    for i, out in enumerate(outputs):
        if args.json:
            print(json.dumps({"index": i, **out.to_dict()}), flush=True)
        elif len(outputs) == 1:
            print(out.text if out.text is not None else out.token_ids, flush=True)
        else:
            print(f"--- {i} ---\n{out.text if out.text is not None else out.token_ids}", flush=True)
    return 0


def _join_generate_world(config: InferenceConfig) -> tuple[Any, InferenceConfig]:
    """Under ``launch_local_ranks`` (or torchrun): join the world of ``dp x tp x pp`` ranks
    and return this rank's ``ParallelState`` and config (its own GPU); alone:
    ``(None, config)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp, pp = config.tensor_model_parallel_size, config.pipeline_model_parallel_size
    dp = config.data_parallel_size
    if world == 1 and tp * pp * dp == 1:
        return None, config
    if world != tp * pp * dp:
        raise McoreError(
            f"{world} ranks were launched, but inference.data_parallel_size ({dp}) x "
            f"tensor_model_parallel_size ({tp}) x pipeline_model_parallel_size ({pp}) = "
            f"{tp * pp * dp}"
        )
    import dataclasses

    import torch
    import torch.distributed as dist

    from mcore.parallel import ParallelState

    cuda = config.device != "cpu" and torch.cuda.is_available()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        config = dataclasses.replace(config, device=f"cuda:{local}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return ParallelState(tp=tp, pp=pp, ep=config.expert_model_parallel_size), config


def _generate_on_replicas(engine: Any, prompts: list, params: Any, ps: Any) -> list | None:
    """Every replica runs its share of the prompts (the ranks of one replica the same, in
    lockstep); the first rank returns all outputs in order, the others None."""
    if ps is None:
        return engine.generate(prompts, params)
    import torch.distributed as dist

    mine = list(range(ps.dp_rank, len(prompts), ps.dp_size))
    # Every rank calls generate, with no prompts too: expert-parallel ranks step together.
    outputs = engine.generate([prompts[i] for i in mine], params)
    gathered: list[Any] = [None] * dist.get_world_size()
    first = ps.tp_rank == 0 and ps.pp_rank == 0  # one rank per replica reports
    dist.all_gather_object(gathered, (mine, outputs) if first else ([], []))
    dist.destroy_process_group()
    if ps.rank != 0:
        return None
    ordered: dict[int, Any] = {}
    for indices, outs in gathered:
        ordered.update(zip(indices, outs, strict=True))
    return [ordered[i] for i in range(len(prompts))]


# -- serve -----------------------------------------------------------------------------------


def _serve_configure(parser: argparse.ArgumentParser) -> None:
    _model_arguments(parser)
    parser.add_argument("--host", default=None, help="address to bind (inference.host: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (inference.port: a free one)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("MCORE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/ routes (default: $MCORE_API_KEY)",
    )
    parser.add_argument("--served-model-name", default=None, help="the model's name in the API")
    _inference_arguments(parser)


def _serve_run(args: argparse.Namespace) -> int:
    config = _inference_config(
        args,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        served_model_name=args.served_model_name,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.model, args.run_config, config))
    return 0


async def _serve(model_path: str, run_config: str | None, config: InferenceConfig) -> None:
    from mcore.inference.server.app import OpenAIServer, run_http_server

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    name = config.served_model_name or Path(model_path).resolve().name
    if config.data_parallel_size > 1 or config.replica_size > 1:
        backend, tokenizer, max_len, cleanup = await _coordinated(model_path, run_config, config)
    else:
        backend, tokenizer, max_len, cleanup = await _in_process(model_path, run_config, config)
    server = OpenAIServer(
        backend, tokenizer, model_name=name, api_key=config.api_key, max_sequence_length=max_len
    )

    def ready(url: str) -> None:
        print(f"mcore serve: {url} (model {name!r}; Ctrl-C to stop)", flush=True)

    try:
        await run_http_server(server, host=config.host, port=config.port, ready=ready, stop=stop)
    finally:
        await cleanup()


async def _in_process(model_path: str, run_config: str | None, config: InferenceConfig):
    from mcore.inference.async_engine import AsyncInferenceEngine
    from mcore.inference.engine import DynamicInferenceEngine
    from mcore.inference.loading import load_model

    model, tokenizer = load_model(model_path, config_file=run_config)
    engine = DynamicInferenceEngine(model, config, tokenizer=tokenizer)
    served = await AsyncInferenceEngine(engine).start()
    return served, tokenizer, engine.max_sequence_length, served.shutdown


async def _coordinated(model_path: str, run_config: str | None, config: InferenceConfig):
    """A coordinator in a thread of this process and ``dp`` model replicas of ``tp x pp``
    engine processes each (see :func:`launch_replicas`)."""
    from mcore.inference.coordinator.client import InferenceClient
    from mcore.inference.coordinator.coordinator import InferenceCoordinator
    from mcore.inference.loading import check_layout, load_tokenizer

    tp, pp = config.tensor_model_parallel_size, config.pipeline_model_parallel_size
    ep = config.expert_model_parallel_size
    check_layout(model_path, tp=tp, pp=pp, ep=ep, config_file=run_config)
    coordinator = InferenceCoordinator(heartbeat_timeout_s=config.heartbeat_timeout_s)
    address = coordinator.start()
    processes = launch_replicas(model_path, run_config, config, address)
    client = InferenceClient(address)
    await client.start(wait_for_engines=config.data_parallel_size, timeout_s=600)
    tokenizer = load_tokenizer(model_path, config_file=run_config)

    async def cleanup() -> None:
        with contextlib.suppress(Exception):
            await client.stop()
        await client.close()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        coordinator.stop()

    return client, tokenizer, config.max_sequence_length, cleanup


def launch_replicas(
    model_path: str,
    run_config: str | None,
    config: InferenceConfig,
    address: str,
    *,
    env: dict[str, str] | None = None,
    stdout: Any = None,
) -> list[subprocess.Popen]:
    """Start ``data_parallel_size`` model replicas of ``replica_size`` (tp x pp) engine
    processes on this host, serving the coordinator at ``address``. Replica ``r``'s processes
    are ``processes[r * size : (r + 1) * size]``, its first the one that registers as engine
    rank ``r``; each replica meets on a port of its own, so one that dies takes no other down.
    With ``expert_model_parallel_size`` E, replicas ``g*E .. g*E+E-1`` (one process each) form
    a group that shares the experts, meeting on a port of the group's.
    CPU threads are split evenly; with GPUs, process ``i`` takes ``cuda:i`` (modulo count)."""
    import dataclasses

    import torch

    dp, size = config.data_parallel_size, config.replica_size
    tp, pp = config.tensor_model_parallel_size, config.pipeline_model_parallel_size
    ep = config.expert_model_parallel_size
    gpus = torch.cuda.device_count() if config.device is None else 0
    threads = max(1, (os.cpu_count() or 1) // (dp * size))
    urls = [f"tcp://127.0.0.1:{_free_port()}" for _ in range(dp // ep if ep > 1 else dp)]
    processes = []
    for rank in range(dp):
        for member in range(size):
            rank_config = dataclasses.asdict(config)
            if gpus:
                rank_config["device"] = f"cuda:{(rank * size + member) % gpus}"
            command = [sys.executable, "-m", "mcore.inference.coordinator.engine_rank"]
            command += ["--model", model_path, "--coordinator", address, "--rank", str(rank)]
            command += ["--config-json", json.dumps(rank_config), "--threads", str(threads)]
            command += ["--parent-pid", str(os.getpid())]
            if ep > 1:
                command += ["--ep", str(ep), "--replica-rank", str(rank % ep)]
                command += ["--dist-url", urls[rank // ep]]
            elif size > 1:
                command += ["--tp", str(tp), "--pp", str(pp), "--replica-rank", str(member)]
                command += ["--dist-url", urls[rank]]
            if run_config:
                command += ["--run-config", run_config]
            # Their own session: Ctrl-C reaches the server, which stops the ranks with STOP.
            processes.append(
                subprocess.Popen(
                    command, start_new_session=True, env=env, stdout=stdout, stderr=stdout
                )
            )
    return processes


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GENERATE = CliCommand(
    help="generate text from a Hugging Face model directory or an mcore checkpoint",
    configure=_generate_configure,
    run=_generate_run,
)
SERVE = CliCommand(
    help="serve a model over the OpenAI HTTP API (/v1/completions, /v1/chat/completions)",
    configure=_serve_configure,
    run=_serve_run,
)
