"""Data-parallel training with retrograd on two (or more) processes.

Run it with ``torchrun --nproc-per-node 2 examples/ddp_train.py`` (CPU and
gloo work; on GPUs each rank takes ``cuda:LOCAL_RANK`` and NCCL). Two faces:

- ``--face compile`` (default): ``DDP(torch.compile(model, backend="retrograd"))``.
  DDP averages the gradients in its hooks; dynamo's DDPOptimizer splits the
  graph at DDP's bucket boundaries, so retrograd compiles one graph per bucket.
- ``--face step``: ``retrograd.compile_step(DDP(model), loss_fn, optimizer)``.
  The whole step -- forward, backward, the gradient average (an all-reduce
  per DDP bucket inside the program, each issued as soon as its gradients
  are final) and the AdamW update -- is one program.
- ``--face group``: the same without the wrapper,
  ``compile_step(model, loss_fn, optimizer, process_group=WORLD)``.

``--bucket-cap-mb`` sets DDP's (or the step's) bucket size; ``--zero`` shards
the optimizer state across ranks (ZeRO-1, the step faces). The step faces
print the report's communication figures (bytes, and the overlap predicted
by the bandwidth model of docs/distributed.md); every face prints the mean
step time after the first step (on several GPUs: NCCL against
``torch.compile`` + DDP).

Each rank trains on its own shard of a synthetic classification set; rank 0
prints the loss averaged over ranks, and at the end every rank checks that
its parameters equal rank 0's. docs/distributed.md explains which idioms work.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import retrograd


def make_model(width: int) -> nn.Module:
    """A small MLP classifier; seeded, so every rank starts alike (DDP also
    broadcasts rank 0's parameters when it wraps the model)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, width), nn.LayerNorm(width), nn.GELU(),
                         nn.Linear(width, width), nn.GELU(), nn.Linear(width, 4))


def shard(step: int, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's batch of ``step``: a distinct slice of one global stream."""
    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(step * world + rank)
    x = torch.randn(batch, 16, generator=generator)
    y = (x[:, :4].argmax(dim=1))   # a learnable rule
    return x.to(device), y.to(device)


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def train(args, device) -> nn.Module:
    model = make_model(args.width).to(device)
    options = {"executor": args.executor}
    buckets = {"bucket_cap_mb": args.bucket_cap_mb} if args.bucket_cap_mb else {}
    if args.face == "compile":
        ddp = DDP(torch.compile(model, backend="retrograd", options=options), **buckets)
        optimizer = torch.optim.AdamW(ddp.parameters(), lr=args.lr)

        def step(x, y):
            optimizer.zero_grad()
            loss = loss_fn(ddp, x, y)
            loss.backward()          # DDP all-reduces the gradients here
            optimizer.step()
            return loss.detach()
    elif args.face == "step":
        ddp = DDP(model, **buckets)
        optimizer = torch.optim.AdamW(ddp.parameters(), lr=args.lr)
        step = retrograd.compile_step(ddp, loss_fn, optimizer,
                                      shard_optimizer_state=args.zero, **options)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
        step = retrograd.compile_step(model, loss_fn, optimizer, process_group=dist.group.WORLD,
                                      shard_optimizer_state=args.zero, **buckets, **options)
    run(step, args, device)
    if args.face != "compile" and dist.get_rank() == 0:
        report_communication(step.reports["step"]["communication"])
    return model


def run(step, args, device) -> None:
    """``args.steps`` steps; rank 0 prints the loss averaged over ranks and
    the mean step time after the first (which compiles)."""
    started = None
    for number in range(args.steps):
        if number == 1:
            started = time.perf_counter()
        loss = step(*shard(number, args.batch, device)).detach().clone()
        dist.all_reduce(loss)   # also keeps the ranks in step for the clock
        if dist.get_rank() == 0:
            print(f"step {number}: loss {loss.item() / dist.get_world_size():.4f}", flush=True)
    if started is not None and dist.get_rank() == 0:
        seconds = (time.perf_counter() - started) / (args.steps - 1)
        print(f"mean step time after the first: {seconds * 1e3:.2f} ms", flush=True)


def report_communication(summary) -> None:
    """The step program's collectives, as the report counts them."""
    if summary is None:
        print("the step program has no collectives")
        return
    ops = Counter(row["op"] for row in summary["collectives"])
    print(f"{summary['count']} collectives ({', '.join(f'{n} {op}' for op, n in ops.items())}), "
          f"{summary['bytes']:,} bytes, {summary['wire_bytes']:,} sent per rank", flush=True)
    if summary["overlap_fraction"] is not None:
        print(f"predicted (bandwidth model, docs/distributed.md): "
              f"{summary['overlapped_seconds'] * 1e6:.3f} of "
              f"{summary['communication_seconds'] * 1e6:.3f} us of communication hidden "
              f"behind {summary['compute_seconds'] * 1e6:.3f} us of compute", flush=True)


def check_replicas(model: nn.Module) -> None:
    """Every rank holds rank 0's parameters (DDP keeps them in step)."""
    for name, parameter in model.named_parameters():
        reference = parameter.detach().clone()
        dist.broadcast(reference, src=0)
        if not torch.equal(reference, parameter.detach()):
            raise SystemExit(f"rank {dist.get_rank()}: {name} differs from rank 0's")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--face", choices=["compile", "step", "group"], default="compile")
    parser.add_argument("--bucket-cap-mb", type=float, default=None,
                        help="DDP's bucket_cap_mb (the step's, with --face group)")
    parser.add_argument("--zero", action="store_true",
                        help="ZeRO-1: optimizer state sharded across ranks (step faces)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--executor", default="auto", help="retrograd's executor option")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        device = torch.device("cuda") if cuda else torch.device("cpu")
        check_replicas(train(args, device))
        if dist.get_rank() == 0:
            print(f"done: {args.face} face, {dist.get_world_size()} ranks, parameters equal "
                  "on every rank")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
