"""Sharded data-parallel training (FSDP2) with retrograd compiling each block.

Run it with ``torchrun --nproc-per-node 2 examples/fsdp2_train.py`` (CPU and
gloo work; on GPUs each rank takes ``cuda:LOCAL_RANK`` and NCCL).

The idiom: compile each block with ``block.compile(backend="retrograd")``
*before* ``fully_shard(block)``, then ``fully_shard`` the root. FSDP2 gathers
a block's parameters in a hook before the block runs and reduce-scatters its
gradients after its backward, outside the compiled graph; retrograd compiles
the block's forward and backward in between. (Compiling the model after
``fully_shard`` traces nothing in torch 2.13: docs/distributed.md.)
``--bf16`` adds a MixedPrecisionPolicy (bf16 parameters and compute, fp32
gradient reduction); ``--no-reshard`` keeps gathered parameters between the
forward and the backward (``reshard_after_forward=False``).

``--face step`` trains the same sharded model with
``retrograd.compile_step(model, loss_fn, optimizer)`` instead: one program
per step that all-gathers each unit's shards, runs forward, backward and
reduce-scatters, and updates this rank's shards (docs/distributed.md,
"compile_step on FSDP2"); it prints the collectives the program holds:
each block is all-gathered again for its backward unless ``--no-reshard``.
With ``--bf16`` the program casts each fp32 shard to bf16 before its
all-gather and reduce-scatters fp32 gradients, as FSDP2's policy does; the
shards and AdamW's state stay fp32.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import retrograd  # also registers the "retrograd" backend in a bare checkout


class Block(nn.Module):
    """A pre-norm residual MLP block: FSDP2's unit of gathering and sharding."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(),
                                 nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class Net(nn.Module):
    def __init__(self, width: int, depth: int):
        super().__init__()
        self.embed = nn.Linear(16, width)
        self.blocks = nn.ModuleList([Block(width) for _ in range(depth)])
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def shard_model(model: Net, args, mesh) -> Net:
    """Compile each block, then shard it; the root (embedding, head) last."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if args.bf16 else MixedPrecisionPolicy()
    for block in model.blocks:
        if args.face == "compile":   # compile_step compiles the whole step itself
            block.compile(backend="retrograd", options={"executor": args.executor})
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=args.reshard)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def batch(step: int, size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's batch of ``step``: a distinct slice of one global stream."""
    generator = torch.Generator().manual_seed(step * dist.get_world_size() + dist.get_rank())
    x = torch.randn(size, 16, generator=generator)
    return x.to(device), x[:, :4].argmax(dim=1).to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bf16 MixedPrecisionPolicy")
    parser.add_argument("--no-reshard", dest="reshard", action="store_false",
                        help="reshard_after_forward=False")
    parser.add_argument("--executor", default="auto", help="retrograd's executor option")
    parser.add_argument("--face", choices=("compile", "step"), default="compile",
                        help="block.compile before fully_shard, or compile_step on the "
                             "sharded model")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        device = torch.device("cuda") if cuda else torch.device("cpu")
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        torch.manual_seed(0)   # the same full model on every rank before sharding
        model = shard_model(Net(args.width, args.depth).to(device), args, mesh)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        train = eager_step if args.face == "compile" else compiled_step(model, optimizer, args)
        for step in range(args.steps):
            loss = train(model, optimizer, *batch(step, args.batch, device))
            total = loss.detach().clone()
            dist.all_reduce(total)
            if dist.get_rank() == 0:
                print(f"step {step}: loss {total.item() / dist.get_world_size():.4f}",
                      flush=True)
        if args.face == "step" and dist.get_rank() == 0:
            ops = train.step.reports["step"]["kernels"]["extern_ops"]
            print("collectives in the step program: "
                  + ", ".join(f"{count} {op.split('.')[1]}" for op, count in sorted(ops.items())
                              if op.startswith("_c10d_functional.") and "wait" not in op),
                  flush=True)
    finally:
        dist.destroy_process_group()


def loss_fn(model, x, y):
    return F.cross_entropy(model(x).float(), y)


def eager_step(model, optimizer, x, y):
    """One step of the compiled blocks under FSDP2's hooks."""
    optimizer.zero_grad()
    loss = loss_fn(model, x, y)
    loss.backward()   # FSDP2 reduce-scatters each block's gradients
    optimizer.step()
    return loss


def compiled_step(model, optimizer, args):
    """One ``compile_step`` program for the whole sharded step."""
    step = retrograd.compile_step(model, loss_fn, optimizer, executor=args.executor)

    def train(model, optimizer, x, y):
        return step(x, y)
    train.step = step
    return train


if __name__ == "__main__":
    main()
