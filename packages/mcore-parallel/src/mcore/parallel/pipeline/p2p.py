"""Point-to-point exchange of activations and their gradients between pipeline stages.

Every exchange is one batch of ``isend``/``irecv`` operations (``dist.batch_isend_irecv``) that
is waited on before returning: a stage that sends its output and needs a gradient posts both at
once, so neighbours that send to each other at the same moment cannot deadlock (with NCCL,
separately issued sends and receives to one peer queue on one stream and can block each other).

Shapes are known in advance, ``(seq, micro_batch, hidden)``, so only data travels. The stages
form a ring: the interleaved schedule sends the last stage's output on to the first stage's
next model chunk. With two stages a rank's next and previous neighbour are the same rank, so
one batch may carry an activation and a gradient to the same peer; both backends then need to
match them up:

- operations are posted activations first, then gradients, on sender and receiver alike (NCCL
  matches one peer's sends and receives in posting order);
- activations and gradients carry different tags (gloo matches on the tag).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from mcore.core import McoreError

_ACTIVATION_TAG = 0
_GRADIENT_TAG = 1

# Process groups whose NCCL communicator has been created by a collective of the whole group.
_NCCL_READY: set[dist.ProcessGroup] = set()


class P2PShapeError(McoreError, ValueError):
    """A tensor handed to a pipeline send does not have the shape or dtype the peers expect."""


def pipeline_tensor_shape(
    seq_length: int,
    micro_batch_size: int,
    hidden_size: int,
    *,
    tp_size: int = 1,
    cp_size: int = 1,
    sequence_parallel: bool = False,
) -> tuple[int, int, int]:
    """Shape of the hidden states that pass between stages: ``[s, b, h]``, sequence-first.

    ``seq_length`` is the global sequence length; each context-parallel rank holds
    ``seq / cp`` of it, and sequence parallelism splits that again over TP.
    """
    seq = _split(seq_length, cp_size, "context_parallel_size")
    if sequence_parallel:
        seq = _split(seq, tp_size, "tensor_model_parallel_size (sequence parallelism)")
    return (seq, micro_batch_size, hidden_size)


def _split(seq: int, size: int, what: str) -> int:
    if seq % size != 0:
        raise P2PShapeError(f"sequence length {seq} does not split evenly over {what} ({size})")
    return seq // size


class P2PCommunicator:
    """Sends and receives ``tensor_shape`` tensors to and from the neighbouring pipeline stages.

    ``exchange`` is the one primitive (a batched round over the ring). The named methods are
    Megatron's vocabulary for the non-interleaved schedule, where nothing is received before
    the first stage or after the last: they return ``None`` (and send nothing) at those ends.
    """

    def __init__(
        self,
        pp_group: dist.ProcessGroup,
        *,
        tensor_shape: Sequence[int],
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.group = pp_group
        self.size = dist.get_world_size(pp_group)
        self.rank = dist.get_rank(pp_group)
        self.next_rank = (self.rank + 1) % self.size
        self.prev_rank = (self.rank - 1) % self.size
        self.tensor_shape = tuple(tensor_shape)
        self.dtype = dtype
        self.device = torch.device(device)
        _ensure_nccl_communicator(pp_group, self.device)

    @property
    def is_first_stage(self) -> bool:
        return self.rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.rank == self.size - 1

    def exchange(
        self,
        *,
        send_next: torch.Tensor | None = None,
        send_prev: torch.Tensor | None = None,
        recv_prev: bool = False,
        recv_next: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One batched round: send an activation to the next stage and/or a gradient to the
        previous one, and receive an activation from the previous and/or a gradient from the
        next. Returns ``(from_prev, from_next)``, ``None`` where nothing was asked for.

        A received activation requires grad: the stage's backward fills its ``.grad``, which
        is the gradient to send back.
        """
        from_prev = self._empty(requires_grad=True) if recv_prev else None
        from_next = self._empty(requires_grad=False) if recv_next else None
        ops: list[dist.P2POp] = []
        # Activations first, then gradients, on every rank: see the module docstring.
        if send_next is not None:
            ops.append(self._op(dist.isend, self._checked(send_next), self.next_rank, True))
        if from_prev is not None:
            ops.append(self._op(dist.irecv, from_prev, self.prev_rank, True))
        if send_prev is not None:
            ops.append(self._op(dist.isend, self._checked(send_prev), self.prev_rank, False))
        if from_next is not None:
            ops.append(self._op(dist.irecv, from_next, self.next_rank, False))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
            if self.device.type == "cuda":
                # Megatron guards batched p2p the same way: the received buffers are used on
                # the compute stream right away.
                torch.cuda.synchronize(self.device)
        return from_prev, from_next

    # Megatron's names, for the non-interleaved schedule.

    def recv_forward(self) -> torch.Tensor | None:
        return None if self.is_first_stage else self.exchange(recv_prev=True)[0]

    def send_forward(self, output: torch.Tensor) -> None:
        if not self.is_last_stage:
            self.exchange(send_next=output)

    def recv_backward(self) -> torch.Tensor | None:
        return None if self.is_last_stage else self.exchange(recv_next=True)[1]

    def send_backward(self, input_grad: torch.Tensor | None) -> None:
        if not self.is_first_stage:
            self.exchange(send_prev=input_grad)

    def send_forward_recv_backward(self, output: torch.Tensor) -> torch.Tensor | None:
        if self.is_last_stage:
            return None
        return self.exchange(send_next=output, recv_next=True)[1]

    def send_backward_recv_forward(self, input_grad: torch.Tensor | None) -> torch.Tensor | None:
        if self.is_first_stage:
            return None
        return self.exchange(send_prev=input_grad, recv_prev=True)[0]

    def _empty(self, *, requires_grad: bool) -> torch.Tensor:
        return torch.empty(
            self.tensor_shape, dtype=self.dtype, device=self.device, requires_grad=requires_grad
        )

    def _checked(self, tensor: torch.Tensor) -> torch.Tensor:
        if tuple(tensor.shape) != self.tensor_shape or tensor.dtype != self.dtype:
            raise P2PShapeError(
                f"pipeline stage {self.rank} sends a tensor of shape {tuple(tensor.shape)} and "
                f"dtype {tensor.dtype}, but the stages exchange {self.tensor_shape} "
                f"(seq, micro_batch, hidden; seq / tp under sequence parallelism) in "
                f"{self.dtype}: check seq_length, micro_batch_size and the pipeline dtype"
            )
        # Communication is not part of the autograd graph; the schedule runs backward itself.
        return tensor.detach().contiguous()

    def _op(self, op, tensor: torch.Tensor, peer: int, activation: bool) -> dist.P2POp:
        tag = _ACTIVATION_TAG if activation else _GRADIENT_TAG
        return dist.P2POp(op, tensor, group=self.group, group_peer=peer, tag=tag)


def _ensure_nccl_communicator(group: dist.ProcessGroup, device: torch.device) -> None:
    """Create an NCCL group's communicator with a collective of all its ranks, once.

    ``batch_isend_irecv`` requires every rank of the group to take part in the group's first
    collective, which a pipeline's first sends (stage 0 to stage 1 only) would not. Every
    pipeline rank builds its communicator at the start of the same schedule call, so all of
    them get here together.
    """
    if group in _NCCL_READY or dist.get_backend(group) != "nccl":
        return
    dist.all_reduce(torch.zeros(1, device=device), group=group)
    _NCCL_READY.add(group)
