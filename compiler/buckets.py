"""Gradient buckets for the all-reduce inside a distributed ``compile_step``.

DDP does not all-reduce each gradient alone (a collective per tensor pays
its latency every time) nor all of them at once (nothing would start before
the whole backward ends): it packs gradients into buckets of about
``bucket_cap_mb`` each, issued in reverse parameter order (the last
layers' gradients are final first), the first parameters in a smaller
bucket (``torch.distributed._DEFAULT_FIRST_BUCKET_BYTES``, 1 MiB, when
``bucket_cap_mb`` is left at its default) so that little is left to send
when the backward ends, and a bucket per dtype. ``assign`` packs the same way (DDP's
``_compute_bucket_assignment_by_size``, with the limits DDP uses once it has
rebuilt its buckets after the first step); ``all_reduce`` traces one
functional all-reduce per bucket into the step's graph, each reading only
its own gradients, so the schedule pass (``passes/schedule.py``) can issue it
as soon as they are final and wait for it only where the update needs it.

The gradients are scaled by ``1 / world_size`` before the sum, as DDP's
reducer divides its bucket before the all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Limits", "all_reduce", "assign"]

#: DDP's default bucket_cap_mb, and its first bucket under that default
DEFAULT_CAP_BYTES = 25 * 1024 * 1024
FIRST_BUCKET_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Bytes a bucket may hold: the first, then every later one."""

    first: int
    rest: int

    @classmethod
    def from_megabytes(cls, bucket_cap_mb: float | None) -> Limits:
        """DDP's rule: the default 25 MiB with a 1 MiB first bucket, else
        ``bucket_cap_mb`` MiB for all."""
        if bucket_cap_mb is None:
            return cls(FIRST_BUCKET_BYTES, DEFAULT_CAP_BYTES)
        if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)) \
                or not bucket_cap_mb > 0:
            raise ValueError(f"retrograd.compile_step: bucket_cap_mb={bucket_cap_mb!r} must be "
                             "a positive number of MiB")
        cap = max(1, int(bucket_cap_mb * 1024 * 1024))
        return cls(cap, cap)

    @classmethod
    def of_ddp(cls, ddp) -> Limits:
        """The limits a DDP module was built with."""
        config = getattr(ddp, "_bucket_config", None)
        if config is not None:
            return cls(config.first_bucket_bytes_cap, config.bucket_bytes_cap)
        return cls(FIRST_BUCKET_BYTES, ddp.bucket_bytes_cap)


def assign(sizes: list[tuple[int, torch.dtype]], limits: Limits) -> list[list[int]]:
    """Buckets of gradient indices for ``(bytes, dtype)`` per gradient, in the
    order they are issued. As DDP's ``_compute_bucket_assignment_by_size``:
    in parameter order, one open bucket per dtype, closed once it holds at
    least its limit (a dtype's first bucket ``limits.first``, later ones
    ``limits.rest``); then reversed, since the last parameters' gradients are
    final first. The small first bucket is so issued last: less waiting
    after the backward's end."""
    open_buckets: dict[torch.dtype, list[int]] = {}
    count: dict[torch.dtype, int] = {}
    closed: list[list[int]] = []
    for index, (nbytes, dtype) in enumerate(sizes):
        bucket = open_buckets.setdefault(dtype, [])
        bucket.append(index)
        limit = limits.rest if count.get(dtype) else limits.first
        if sum(sizes[i][0] for i in bucket) >= limit:
            closed.append(open_buckets.pop(dtype))
            count[dtype] = count.get(dtype, 0) + 1
    closed += [bucket for bucket in open_buckets.values() if bucket]
    closed.sort(key=min)
    return [sorted(bucket, reverse=True) for bucket in reversed(closed)]


def all_reduce(grads: list[torch.Tensor], group: Any, world_size: int,
               limits: Limits) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Each gradient averaged across ``group``: per bucket, the gradients
    flattened into one buffer times ``1 / world_size``, one functional
    all-reduce, the result split back. Returns the averaged gradients (in
    ``grads``' order) and the buckets. Traced into the step's graph: every
    rank traces the same buckets in the same order, and the schedule keeps
    the issues in that order."""
    import torch.distributed._functional_collectives as funcol
    buckets = assign([(g.numel() * g.element_size(), g.dtype) for g in grads], limits)
    averaged: list[Any] = [None] * len(grads)
    for members in buckets:
        flat = torch.cat([grads[i].reshape(-1) for i in members]) * (1.0 / world_size)
        total = funcol.all_reduce(flat, "sum", group)
        pieces = torch.split(total, [grads[i].numel() for i in members])
        for i, piece in zip(members, pieces):
            averaged[i] = piece.view(grads[i].shape)
    return averaged, buckets
