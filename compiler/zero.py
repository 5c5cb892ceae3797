"""ZeRO-1 for a distributed ``compile_step``: optimizer state sharded across ranks.

With ``compile_step(..., shard_optimizer_state=True)`` (on DDP or with
``process_group=``) every trainable parameter is owned by one rank
(``owners``: largest first, each to the rank holding the fewest elements so
far, as ``torch.distributed.optim.ZeroRedundancyOptimizer`` partitions; over
all trainable parameters, so an owner and its state stay put when a
signature's loss reaches fewer). Each rank keeps the optimizer state (Adam's
two moments, SGD's momentum) of its own parameters alone: about
``1 / world_size`` of it. ``optimizer.state`` on a rank holds its own
parameters' state; the others' entries stay empty.

The communication is ZeRO's, two collectives per step instead of DDP's
all-reduce (which sends twice the gradient bytes):

- ``reduce_scatter``: per gradient bucket (DDP's buckets, ``buckets.py``, so
  each is issued as soon as its gradients are final), the gradients laid out
  rank by rank (each rank's chunk the gradients it owns, zero-padded to the
  largest chunk), times ``1 / world_size``, one functional reduce-scatter:
  each rank receives the averaged gradients of its own parameters only.
- each rank runs the optimizer update of its own parameters (a gradient
  clip's norm is summed across ranks by a one-element all-reduce);
- ``gather``: per dtype, each rank's updated parameters flattened into one
  chunk (zero-padded to the largest), one functional all-gather, split back:
  every rank ends the step with the same parameters, as DDP's would.

The padding is sent and counted: the report's ``communication`` bytes are
the collectives' real input and output sizes. Everything is traced into the
step's graph; every rank traces the same collectives with the same sizes in
the same order (its own chunk differs).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["clip", "gather", "owners", "reduce_scatter"]


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


def _layout(sizes: list[int], members: list[int], owner: list[int],
            world_size: int) -> tuple[list[list[int]], int]:
    """``members`` split by owner (rank order, members' order kept) and the
    chunk width: the largest rank's element count."""
    parts = [[i for i in members if owner[i] == rank] for rank in range(world_size)]
    return parts, max(sum(sizes[i] for i in part) for part in parts)


def _chunk(values: list[torch.Tensor], part: list[int], width: int,
           like: torch.Tensor) -> list[torch.Tensor]:
    """``part``'s values flattened, then zeros up to ``width`` elements."""
    pieces = [values[i].reshape(-1) for i in part]
    pad = width - sum(piece.numel() for piece in pieces)
    return pieces + ([like.new_zeros(pad)] if pad else [])


def _split(flat: torch.Tensor, part: list[int], values: list[torch.Tensor],
           out: list) -> None:
    """``flat``'s leading elements back into ``part``'s shapes, into ``out``."""
    sizes = [values[i].numel() for i in part]
    rest = flat.numel() - sum(sizes)
    pieces = torch.split(flat, sizes + ([rest] if rest else []))
    for i, piece in zip(part, pieces):
        out[i] = piece.view(values[i].shape)


def reduce_scatter(grads: list[torch.Tensor], owner: list[int], rank: int, group: Any,
                   world_size: int, limits) -> list[torch.Tensor | None]:
    """Each gradient ``rank`` owns averaged across ``group`` (None for the
    others): per DDP bucket, one functional reduce-scatter of the gradients
    laid out rank by rank (module docstring)."""
    import torch.distributed._functional_collectives as funcol
    from retrograd.buckets import assign
    sizes = [g.numel() for g in grads]
    averaged: list[Any] = [None] * len(grads)
    for members in assign([(g.numel() * g.element_size(), g.dtype) for g in grads], limits):
        parts, width = _layout(sizes, members, owner, world_size)
        like = grads[members[0]]
        flat = torch.cat([piece for part in parts for piece in _chunk(grads, part, width, like)])
        mine = funcol.reduce_scatter_tensor(flat * (1.0 / world_size), "sum", 0, group)
        _split(mine, parts[rank], grads, averaged)
    return averaged


def gather(values: list[torch.Tensor], owner: list[int], rank: int, group: Any,
           world_size: int) -> list[torch.Tensor]:
    """Every value as its owner computed it (``values[i]`` is only read on
    its owner): per dtype, each rank's chunk all-gathered, then split back."""
    import torch.distributed._functional_collectives as funcol
    sizes = [v.numel() for v in values]
    shared: list[Any] = list(values)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for index, value in enumerate(values):
        by_dtype.setdefault(value.dtype, []).append(index)
    for members in by_dtype.values():
        parts, width = _layout(sizes, members, owner, world_size)
        flat = torch.cat(_chunk(values, parts[rank], width, values[members[0]]))
        total = funcol.all_gather_tensor(flat, 0, group)
        for source, part in enumerate(parts):
            _split(total[source * width:(source + 1) * width], part, values, shared)
    return shared


def clip(grads: list[torch.Tensor | None], max_norm: float, like: list[torch.Tensor],
         group: Any) -> list[torch.Tensor | None]:
    """``clip_grad_norm_`` over gradients sharded across ranks (None where
    another rank owns it): the squared norms of this rank's summed, then
    summed across ranks by a one-element all-reduce, in float64 where any
    gradient is float64, else float32 (``like``: the parameters, one per
    gradient, the same dtypes on every rank)."""
    import torch.distributed._functional_collectives as funcol
    wide = torch.float64 if any(p.dtype == torch.float64 for p in like) else torch.float32
    total = torch.zeros((), dtype=wide, device=like[0].device)
    for g in (g for g in grads if g is not None):
        total = total + g.to(wide).square().sum()
    total = funcol.all_reduce(total.reshape(1), "sum", group).reshape(()).sqrt()
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return [None if g is None else g * scale.to(g.dtype) for g in grads]
