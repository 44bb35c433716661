"""Forward-backward schedules over micro-batches, with Megatron-Core's calling convention.

```python
forward_backward_func = get_forward_backward_func(parallel_state, vp_size=None)
metrics = forward_backward_func(
    forward_step_func=forward_step,  # (data_iterator, model_chunk) -> (output, loss_func)
    data_iterator=data_iterator,  # one per model chunk with interleaving
    model=model_chunks,  # this rank's chunks: [model], or one per virtual stage
    num_microbatches=4,
    seq_length=seq_length,
    micro_batch_size=micro_batch_size,
    forward_only=False,
)
for chunk in model_chunks:  # with data-parallel wrappers
    chunk.finish_grad_sync()
allreduce_embedding_grads(model_chunks, parallel_state)  # tied embeddings over stages
optimizer.step()
```

``forward_step_func`` reads a micro-batch and runs the chunk; on the last stage the schedule
calls ``loss_func(output) -> (loss, metrics)``, divides the loss by ``num_microbatches`` (so
the accumulated gradients are those of the mean over the global batch) and collects
``metrics``. Every schedule returns the list of per-micro-batch metrics on the last stage and
``[]`` on the others. Gradients accumulate wherever backward leaves them (``.grad``, or a
data-parallel wrapper's ``main_grad``); ``grad_scale_func``, when given, scales the loss before
its backward (loss scaling for fp16).

A model chunk that receives from a previous stage must offer ``set_input_tensor(tensor)``
(Megatron's convention; ``None`` is passed on the first stage), and pipelined schedules read
``pipeline_hidden_size`` (else ``config.hidden_size``) and, when present,
``sequence_parallel`` for the exchanged shape.
Attributes are also looked up through wrappers that keep the model as ``.module``.
A chunk that has ``no_sync()`` (a data-parallel wrapper) runs every micro-batch but its last
inside it, so gradients are reduced over data-parallel ranks once, after the last backward.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from mcore.core import McoreError
from mcore.core.training.profiling import ranges
from mcore.parallel.errors import ParallelLayoutError
from mcore.parallel.pipeline.p2p import P2PCommunicator, pipeline_tensor_shape
from mcore.parallel.state import ParallelState

LossFunc = Callable[[torch.Tensor], tuple[torch.Tensor, Any]]
ForwardStepFunc = Callable[[Any, torch.nn.Module], tuple[torch.Tensor, LossFunc]]

_MISSING = object()


def get_forward_backward_func(
    parallel_state: ParallelState, vp_size: int | None = None
) -> Callable[..., list[Any]]:
    """The schedule for a layout, with ``parallel_state`` bound (``.func`` is the schedule).

    One stage: :func:`forward_backward_no_pipelining`; several: 1F1B
    (:func:`forward_backward_pipelining_without_interleaving`), or the interleaved schedule
    when ``vp_size`` (``virtual_pipeline_model_parallel_size``) is above 1.
    """
    if parallel_state.pp_size == 1:
        if vp_size is not None and vp_size > 1:
            raise ParallelLayoutError(
                f"virtual_pipeline_model_parallel_size is {vp_size}, but interleaving needs "
                "pipeline_model_parallel_size > 1"
            )
        schedule = forward_backward_no_pipelining
    elif vp_size is not None and vp_size > 1:
        schedule = forward_backward_pipelining_with_interleaving
    else:
        schedule = forward_backward_pipelining_without_interleaving
    return functools.partial(schedule, parallel_state=parallel_state)


def forward_backward_no_pipelining(
    *,
    forward_step_func: ForwardStepFunc,
    data_iterator: Iterator | list[Iterator] | None,
    model: torch.nn.Module | list[torch.nn.Module],
    num_microbatches: int,
    seq_length: int | None = None,
    micro_batch_size: int | None = None,
    forward_only: bool = False,
    parallel_state: ParallelState | None = None,
    grad_scale_func: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[Any]:
    """Forward and backward of each micro-batch in turn on one stage (gradient accumulation).

    ``seq_length``, ``micro_batch_size`` and ``parallel_state`` are accepted for a uniform
    call and unused: nothing is communicated.
    """
    chunks, iterators = _chunks(model, data_iterator, "forward_backward_no_pipelining")
    if len(chunks) != 1:
        raise ParallelLayoutError(
            f"forward_backward_no_pipelining runs one model chunk, got {len(chunks)}"
        )
    steps = _MicroBatchSteps(
        forward_step_func, chunks, iterators, num_microbatches, grad_scale_func
    )
    with _grad_mode(forward_only):
        for _ in range(num_microbatches):
            output = steps.forward(0, None, computes_loss=True)
            if not forward_only:
                steps.backward(0, None, output, None)
    return steps.metrics


def forward_backward_pipelining_without_interleaving(
    *,
    forward_step_func: ForwardStepFunc,
    data_iterator: Iterator | list[Iterator] | None,
    model: torch.nn.Module | list[torch.nn.Module],
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
    parallel_state: ParallelState | None = None,
    grad_scale_func: Callable[[torch.Tensor], torch.Tensor] | None = None,
    hidden_size: int | None = None,
    sequence_parallel: bool | None = None,
    pipeline_dtype: torch.dtype | None = None,
) -> list[Any]:
    """The 1F1B schedule: warm-up forwards, then one forward and one backward in turn, then
    the remaining backwards.

    Stage ``s`` of ``p`` runs ``p - s - 1`` warm-up forwards (the micro-batches in flight
    ahead of it), so at most ``p - s`` micro-batches' activations are alive on it at once,
    whatever ``num_microbatches`` is. ``hidden_size``, ``sequence_parallel`` and
    ``pipeline_dtype`` (the dtype of the exchanged activations) default to the model's.
    """
    name = "forward_backward_pipelining_without_interleaving"
    chunks, iterators = _chunks(model, data_iterator, name)
    if len(chunks) != 1:
        raise ParallelLayoutError(
            f"{name} runs one model chunk per stage, got {len(chunks)}: use "
            "forward_backward_pipelining_with_interleaving for virtual stages"
        )
    ps = _parallel_state(parallel_state, chunks)
    comm = _communicator(
        chunks, ps, seq_length, micro_batch_size, hidden_size, sequence_parallel, pipeline_dtype
    )
    steps = _MicroBatchSteps(
        forward_step_func, chunks, iterators, num_microbatches, grad_scale_func
    )
    is_last = comm.is_last_stage

    num_warmup = min(comm.size - comm.rank - 1, num_microbatches)
    num_steady = num_microbatches - num_warmup
    # Inputs and outputs of the micro-batches whose backward is still to come, oldest first.
    inputs: deque[torch.Tensor | None] = deque()
    outputs: deque[torch.Tensor] = deque()

    with _grad_mode(forward_only):
        for _ in range(num_warmup):
            x = comm.recv_forward()
            y = steps.forward(0, x, computes_loss=is_last)
            comm.send_forward(y)
            if not forward_only:
                inputs.append(x)
                outputs.append(y)

        x = comm.recv_forward() if num_steady > 0 else None
        for i in range(num_steady):
            last = i == num_steady - 1
            y = steps.forward(0, x, computes_loss=is_last)
            if forward_only:
                comm.send_forward(y)
                if not last:
                    x = comm.recv_forward()
                continue
            dy = comm.send_forward_recv_backward(y)
            inputs.append(x)
            outputs.append(y)
            dx = steps.backward(0, inputs.popleft(), outputs.popleft(), dy)
            if last:
                comm.send_backward(dx)
            else:
                x = comm.send_backward_recv_forward(dx)

        if not forward_only:
            for _ in range(num_warmup):
                dy = comm.recv_backward()
                dx = steps.backward(0, inputs.popleft(), outputs.popleft(), dy)
                comm.send_backward(dx)
    return steps.metrics


def forward_backward_pipelining_with_interleaving(
    *,
    forward_step_func: ForwardStepFunc,
    data_iterator: list[Iterator] | None,
    model: list[torch.nn.Module],
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
    parallel_state: ParallelState | None = None,
    grad_scale_func: Callable[[torch.Tensor], torch.Tensor] | None = None,
    hidden_size: int | None = None,
    sequence_parallel: bool | None = None,
    pipeline_dtype: torch.dtype | None = None,
) -> list[Any]:
    """The interleaved 1F1B schedule over ``v = len(model)`` model chunks per stage.

    Chunk ``c`` of stage ``s`` is virtual stage ``c * p + s``: a micro-batch crosses the ring
    of stages ``v`` times, the last stage handing its output to the first stage's next chunk.
    Micro-batches go in groups of ``p``: each stage runs the group through chunk 0, then chunk
    1, ..., and backwards in the reverse chunk order, which cuts the pipeline bubble by ``v``
    for ``v`` times the point-to-point traffic. ``data_iterator`` is a list with one iterator
    per chunk; ``num_microbatches`` must be a multiple of the number of stages. The step
    bookkeeping follows Megatron-Core's schedule without communication overlap.
    """
    name = "forward_backward_pipelining_with_interleaving"
    chunks, iterators = _chunks(model, data_iterator, name)
    ps = _parallel_state(parallel_state, chunks)
    comm = _communicator(
        chunks, ps, seq_length, micro_batch_size, hidden_size, sequence_parallel, pipeline_dtype
    )
    steps = _MicroBatchSteps(
        forward_step_func, chunks, iterators, num_microbatches, grad_scale_func
    )
    p, rank, v = comm.size, comm.rank, len(chunks)
    if num_microbatches % p != 0:
        raise ParallelLayoutError(
            f"the interleaved schedule needs num_microbatches ({num_microbatches}) divisible "
            f"by pipeline_model_parallel_size ({p})"
        )
    total = num_microbatches * v  # (micro-batch, chunk) steps on each stage

    def chunk_of(step: int, forward: bool = True) -> int:
        """The chunk that this stage's ``step``-th forward (or backward) runs."""
        chunk = step % (p * v) // p
        return chunk if forward else v - 1 - chunk

    def is_first_virtual_stage(chunk: int) -> bool:
        return comm.is_first_stage and chunk == 0

    def is_last_virtual_stage(chunk: int) -> bool:
        return comm.is_last_stage and chunk == v - 1

    all_warmup = False
    if forward_only:
        num_warmup = total
    elif num_microbatches == p:
        # As many micro-batches as stages: every forward before any backward.
        num_warmup, all_warmup = total, True
    else:
        # Earlier stages run more forwards before their first backward (two per later stage:
        # a forward and a backward must travel there and back), plus a full round of the
        # other chunks.
        num_warmup = min((p - rank - 1) * 2 + (v - 1) * p, total)
    num_steady = total - num_warmup

    # Per chunk, oldest first: inputs and outputs awaiting backward, and received gradients.
    # inputs[c][i] is the input of outputs[c][i]; the first virtual stage's inputs are None.
    inputs: list[list[torch.Tensor | None]] = [[] for _ in range(v)]
    outputs: list[list[torch.Tensor]] = [[] for _ in range(v)]
    output_grads: list[list[torch.Tensor | None]] = [[] for _ in range(v)]

    def forward(step: int) -> torch.Tensor | None:
        """Run forward ``step``; return what to send on (``None`` on the last virtual stage)."""
        c = chunk_of(step)
        if is_first_virtual_stage(c):
            inputs[c].append(None)
        x = inputs[c][len(outputs[c])]
        y = steps.forward(c, x, computes_loss=is_last_virtual_stage(c))
        if forward_only:
            inputs[c].pop()
        else:
            outputs[c].append(y)
        return None if is_last_virtual_stage(c) else y

    def backward(step: int) -> torch.Tensor | None:
        """Run backward ``step``; return the gradient to send back (``None`` on the first
        virtual stage)."""
        c = chunk_of(step, forward=False)
        dy = None if is_last_virtual_stage(c) else output_grads[c].pop(0)
        dx = steps.backward(c, inputs[c].pop(0), outputs[c].pop(0), dy)
        return None if is_first_virtual_stage(c) else dx

    with _grad_mode(forward_only):
        if not comm.is_first_stage:
            inputs[0].append(comm.exchange(recv_prev=True)[0])

        for k in range(num_warmup):
            send = forward(k)
            next_chunk = chunk_of(k + 1)
            recv_prev = not (comm.is_first_stage and next_chunk == 0) and k != total - 1
            if k == num_warmup - 1 and not forward_only and not all_warmup:
                # The last warm-up step also fetches the steady state's first gradient.
                recv_next = not comm.is_last_stage
                x, dy = comm.exchange(send_next=send, recv_prev=recv_prev, recv_next=recv_next)
                if recv_next:
                    output_grads[v - 1].append(dy)
            else:
                x, _ = comm.exchange(send_next=send, recv_prev=recv_prev)
            if recv_prev:
                inputs[next_chunk].append(x)

        for k in range(num_steady):
            forward_k = k + num_warmup
            send_next = forward(forward_k)
            send_prev = backward(k)
            # Where the tensors received now belong. The first stage receives from the last,
            # which runs p - 1 forward steps behind it; symmetrically for gradients.
            if comm.is_first_stage:
                sender_chunk = chunk_of(forward_k - (p - 1))
                recv_prev, next_chunk = sender_chunk != v - 1, sender_chunk + 1
            else:
                recv_prev, next_chunk = True, chunk_of(forward_k + 1)
            if comm.is_last_stage:
                sender_chunk = chunk_of(k - (p - 1), forward=False)
                recv_next, next_grad_chunk = sender_chunk != 0, sender_chunk - 1
            else:
                recv_next, next_grad_chunk = True, chunk_of(k + 1, forward=False)
            if k == num_steady - 1:
                recv_prev = False  # no forwards left
            x, dy = comm.exchange(
                send_next=send_next, send_prev=send_prev, recv_prev=recv_prev, recv_next=recv_next
            )
            if recv_prev:
                inputs[next_chunk].append(x)
            if recv_next:
                output_grads[next_grad_chunk].append(dy)

        if not forward_only:
            if all_warmup and not comm.is_last_stage:
                output_grads[v - 1].append(comm.exchange(recv_next=True)[1])
            for k in range(num_steady, total):
                send_prev = backward(k)
                next_grad_chunk = chunk_of(k + 1, forward=False)
                recv_next = not (comm.is_last_stage and next_grad_chunk == v - 1) and k != total - 1
                _, dy = comm.exchange(send_prev=send_prev, recv_next=recv_next)
                if recv_next:
                    output_grads[next_grad_chunk].append(dy)
    return steps.metrics


class _MicroBatchSteps:
    """One micro-batch's forward (with the loss on the loss stage) and backward on a chunk,
    as every schedule runs them."""

    def __init__(
        self,
        forward_step_func: ForwardStepFunc,
        chunks: list[torch.nn.Module],
        iterators: list[Any],
        num_microbatches: int,
        grad_scale_func: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> None:
        if num_microbatches < 1:
            raise ParallelLayoutError(f"num_microbatches must be >= 1, got {num_microbatches}")
        self.forward_step_func = forward_step_func
        self.chunks, self.iterators = chunks, iterators
        self.num_microbatches = num_microbatches
        self.grad_scale_func = grad_scale_func
        self.metrics: list[Any] = []
        self._forwards = [0] * len(chunks)
        self._backwards = [0] * len(chunks)

    def forward(
        self, chunk: int, input_tensor: torch.Tensor | None, *, computes_loss: bool
    ) -> torch.Tensor:
        """The chunk's output, or on the loss stage its loss divided by ``num_microbatches``."""
        module = self.chunks[chunk]
        set_input_tensor = _model_attr(module, "set_input_tensor", None)
        if set_input_tensor is not None:
            set_input_tensor(input_tensor)
        elif input_tensor is not None:  # a plain model is fine where nothing is received
            _model_attr(module, "set_input_tensor")  # raises, naming what is missing
        with self._grad_sync(chunk, self._forwards), ranges.range("forward"):
            output, loss_func = self.forward_step_func(self.iterators[chunk], module)
        if not computes_loss:
            return output
        with ranges.range("loss"):
            result = loss_func(output)
        if not (isinstance(result, tuple) and len(result) == 2):
            raise McoreError(
                "loss_func(output) must return (loss, metrics) as in Megatron-Core, got "
                f"{type(result).__name__}"
            )
        loss, metrics = result
        self.metrics.append(metrics)
        return loss / self.num_microbatches

    def backward(
        self,
        chunk: int,
        input_tensor: torch.Tensor | None,
        output: torch.Tensor,
        output_grad: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """Backward from the chunk's output; the gradient of its input (``None`` when the
        input came from the data, not from a previous stage)."""
        if output_grad is None and self.grad_scale_func is not None:
            output = self.grad_scale_func(output)  # loss scaling for fp16
        with self._grad_sync(chunk, self._backwards), ranges.range("backward"):
            torch.autograd.backward(output, grad_tensors=output_grad)
        return None if input_tensor is None else input_tensor.grad

    def _grad_sync(self, chunk: int, counts: list[int]) -> AbstractContextManager:
        """``no_sync()`` of a data-parallel wrapper for all but the chunk's last micro-batch."""
        counts[chunk] += 1
        no_sync = getattr(self.chunks[chunk], "no_sync", None)
        if no_sync is None or counts[chunk] == self.num_microbatches:
            return nullcontext()
        return no_sync()


def _grad_mode(forward_only: bool) -> AbstractContextManager:
    # Forward-only runs (evaluation) keep no autograd graph.
    return torch.no_grad() if forward_only else nullcontext()


def _chunks(
    model: torch.nn.Module | list[torch.nn.Module], data_iterator: Any, schedule: str
) -> tuple[list[torch.nn.Module], list[Any]]:
    """The model chunks and one data iterator per chunk (``None`` serves every chunk)."""
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    if not chunks:
        raise McoreError(f"{schedule} got no model chunks")
    if isinstance(data_iterator, (list, tuple)):
        iterators = list(data_iterator)
    elif data_iterator is None or len(chunks) == 1:
        iterators = [data_iterator] * len(chunks)
    else:
        raise McoreError(
            f"{schedule} runs {len(chunks)} model chunks and needs a list with one data "
            "iterator per chunk (each chunk reads every micro-batch)"
        )
    if len(iterators) != len(chunks):
        raise McoreError(
            f"{schedule} got {len(iterators)} data iterators for {len(chunks)} model chunks"
        )
    return chunks, iterators


def _parallel_state(
    parallel_state: ParallelState | None, chunks: list[torch.nn.Module]
) -> ParallelState:
    if parallel_state is None:
        parallel_state = _model_attr(chunks[0], "parallel_state", None)
    if parallel_state is None:
        raise McoreError(
            "pass parallel_state= to the schedule (get_forward_backward_func binds it), or use "
            "model chunks that carry a parallel_state"
        )
    return parallel_state


def _communicator(
    chunks: list[torch.nn.Module],
    ps: ParallelState,
    seq_length: int,
    micro_batch_size: int,
    hidden_size: int | None,
    sequence_parallel: bool | None,
    dtype: torch.dtype | None,
) -> P2PCommunicator:
    """The stage's communicator: shapes from the arguments or the model, device and dtype
    from the model's first parameter."""
    if ps.pp_group is None or ps.pp_size == 1:
        raise ParallelLayoutError(
            "a pipelined schedule needs pipeline_model_parallel_size > 1; use "
            "forward_backward_no_pipelining (get_forward_backward_func picks it)"
        )
    if hidden_size is None:
        # A chunk that sends more than its hidden states (a distillation wrapper sends the
        # teacher's beside them) gives the width it exchanges as pipeline_hidden_size.
        hidden_size = _model_attr(chunks[0], "pipeline_hidden_size", None)
        if hidden_size is None:
            hidden_size = _model_attr(chunks[0], "config").hidden_size
        assert hidden_size is not None, "the model config gives the hidden size"
    if sequence_parallel is None:
        sequence_parallel = bool(_model_attr(chunks[0], "sequence_parallel", False))
    param = next(iter(chunks[0].parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = dtype or (param.dtype if param is not None else torch.get_default_dtype())
    shape = pipeline_tensor_shape(
        seq_length,
        micro_batch_size,
        hidden_size,
        tp_size=ps.tp_size,
        cp_size=ps.cp_size,
        sequence_parallel=sequence_parallel,
    )
    return P2PCommunicator(ps.pp_group, tensor_shape=shape, dtype=dtype, device=device)


def _model_attr(module: torch.nn.Module, name: str, default: Any = _MISSING) -> Any:
    """``module.name``, looked up through wrappers that keep the model as ``.module``."""
    current: Any = module
    while current is not None:
        if hasattr(current, name):
            return getattr(current, name)
        current = getattr(current, "module", None)
    if default is not _MISSING:
        return default
    raise McoreError(
        f"a pipeline model chunk ({type(module).__name__}) needs a {name!r} attribute, as "
        "GPTModel has (set_input_tensor(tensor), config.hidden_size)"
    )
