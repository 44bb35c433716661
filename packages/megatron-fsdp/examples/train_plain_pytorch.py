"""Train a small PyTorch decoder with megatron_fsdp: plain torch, no mcore.

    torchrun --nproc-per-node 2 train_plain_pytorch.py            # CPU, gloo
    torchrun --nproc-per-node 8 train_plain_pytorch.py --bf16     # GPUs, NCCL

Each block is sharded on its own (gathered just before it runs, freed after), then the root;
an ordinary AdamW steps the fp32 shards. At the end the run saves an ``fsdp_dtensor``
checkpoint, which loads at any world size.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

import megatron_fsdp


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads=4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(h)


class Decoder(nn.Module):
    def __init__(self, vocab: int = 256, dim: int = 64, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--bf16", action="store_true", help="compute in bf16 (fp32 shards)")
    parser.add_argument("--checkpoint", default=None, help="directory to save to at the end")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    mesh = init_device_mesh("cuda" if cuda else "cpu", (dist.get_world_size(),))
    device = mesh.device_type

    torch.manual_seed(0)  # every rank builds the same model; each keeps its shard of it
    model = Decoder()
    policy = megatron_fsdp.MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if args.bf16 else None, reduce_dtype=torch.float32
    )
    for block in model.blocks:
        megatron_fsdp.fully_shard(block, mesh=mesh, mp_policy=policy)
    megatron_fsdp.fully_shard(model, mesh=mesh, mp_policy=policy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    generator = torch.Generator().manual_seed(dist.get_rank())
    first = last = None
    for step in range(args.steps):
        # A learnable toy task: each token is the previous one plus 3, modulo the vocabulary.
        start = torch.randint(0, 256, (8, 1), generator=generator)
        ids = ((start + 3 * torch.arange(33)) % 256).to(device)
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        megatron_fsdp.clip_grad_norm_(model, max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad()
        value = loss.detach().clone()
        dist.all_reduce(value)
        value = value.item() / dist.get_world_size()
        first = value if first is None else first
        last = value
        if dist.get_rank() == 0 and step % 10 == 0:
            print(f"step {step:3d}  loss {value:.4f}", flush=True)

    footprint = megatron_fsdp.memory_footprint(model, optimizer)
    if dist.get_rank() == 0:
        print(f"loss {first:.4f} -> {last:.4f}")
        print(f"model state on this rank: {footprint.params_grads_optimizer / 2**20:.2f} MiB")
    if args.checkpoint:
        megatron_fsdp.save_checkpoint(args.checkpoint, model, optimizer)
    # Rank 0 still writes the checkpoint's metadata after the others return from the save:
    # tearing the group down only once every rank is here keeps gloo from aborting a rank
    # whose peer already closed its connections.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
