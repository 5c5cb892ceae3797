"""ZeRO-1 for a distributed ``compile_step``: optimizer state sharded across ranks.

With ``compile_step(..., shard_optimizer_state=True)`` (on DDP or with
``process_group=``) every trainable parameter is owned by one rank
(``owners``: largest first, each to the rank holding the fewest elements so
far, as ``torch.distributed.optim.ZeroRedundancyOptimizer`` partitions; over
all trainable parameters, so an owner and its state stay put when a
signature's loss reaches fewer). All ranks average the gradients as before; each rank then runs
the optimizer update of its own parameters only, so it keeps the optimizer
state (Adam's two moments, SGD's momentum) of those alone: about
``1 / world_size`` of it. The updated parameters are then sent from their
owners to every rank (``share``: per owner and dtype, one flat functional
broadcast traced into the step's graph), so every rank ends the step with
the same parameters, as DDP's would. ``optimizer.state`` on a rank holds its
own parameters' state; the others' entries stay empty.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["owners", "share"]


def owners(sizes: list[int], world_size: int) -> list[int]:
    """The owning rank of each parameter (``sizes``: element counts):
    largest first, each to the rank with the fewest elements so far (the
    lower rank on a tie). The same on every rank: it depends only on sizes."""
    load = [0] * world_size
    owner = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[index] = rank
        load[rank] += sizes[index]
    return owner


def share(values: list[torch.Tensor], owner: list[int], group: Any,
          world_size: int) -> list[torch.Tensor]:
    """Each value as its owner computed it: per owner and dtype, the values
    flattened into one buffer and broadcast from the owner (a functional
    collective traced into the graph), then split back. Every rank traces
    the same broadcasts in the same order."""
    import torch.distributed._functional_collectives as funcol
    shared: list[Any] = list(values)
    for rank in range(world_size):
        by_dtype: dict[torch.dtype, list[int]] = {}
        for index, value in enumerate(values):
            if owner[index] == rank:
                by_dtype.setdefault(value.dtype, []).append(index)
        for members in by_dtype.values():
            flat = torch.cat([values[i].reshape(-1) for i in members])
            total = funcol.broadcast(flat, rank, group)
            for i, piece in zip(members, torch.split(total, [values[i].numel()
                                                             for i in members])):
                shared[i] = piece.view(values[i].shape)
    return shared
