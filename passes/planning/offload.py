"""Which saved activations to offload, and when to copy them back: a bandwidth model.

A saved activation kept on the device costs its bytes from its last forward
reader to its first backward reader. Recomputing it costs time; offloading
it costs PCIe bandwidth, which is free when the copy hides behind compute.
The automatic choice (CUDA only: on the CPU host and device memory are one)
offloads a value when all of these hold:

- recomputing it is dear: it is not cheap by the checkpoint's default rule
  (a matrix product, convolution, extern op or random draw: ``dear``), so
  the planner saved it rather than recomputing it;
- it is at least ``MIN_BYTES`` (smaller copies are latency, not bandwidth);
- its copy out hides behind the forward compute after its last forward
  reader, and its copy back behind the backward compute before its first
  backward reader, with every copy of the plan sharing one PCIe link
  (``feasible``).

Times come from a roofline per node: ``flops / DEVICE_FLOPS + bytes moved /
DEVICE_BYTES``, the copies from ``bytes / PCIE_BYTES`` (~25 GB/s, PCIe 4 x16
as measured; PCIe 5 is faster, so the model errs towards fewer offloads, as
it does by taking a fast device). Candidates are tried largest first and
kept while the plan stays feasible. Copies back are scheduled as late as
the link allows (``latest_starts``: the device copy is held no longer than
needed), which places each prefetch.

These are model figures, not measurements: the speed on a GPU is measured
by ``benchmarks/`` when one is available.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from retrograd.passes.op_classes import is_pure, is_view
from retrograd.passes.planning import remat
from torch import fx

__all__ = [
    "DEVICE_BYTES",
    "DEVICE_FLOPS",
    "MIN_BYTES",
    "PCIE_BYTES",
    "Candidate",
    "choose",
    "copy_seconds",
    "dear",
    "feasible",
    "latest_starts",
    "node_seconds",
]

#: host <-> device bandwidth in bytes per second (PCIe 4 x16, measured ~25 GB/s)
PCIE_BYTES = 25e9
#: device arithmetic and memory speed of the roofline (a fast device: fewer offloads)
DEVICE_FLOPS = 400e12
DEVICE_BYTES = 3e12
#: smaller values are never offloaded automatically
MIN_BYTES = 1 << 20


@dataclass(frozen=True)
class Candidate:
    """A saved activation: ``ready`` is the forward time (seconds from the
    forward's start) when its last forward reader ends, ``deadline`` the
    backward time when its first backward reader starts."""

    name: str
    nbytes: int
    ready: float
    deadline: float
    dear: bool = True


def _bytes(value) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def node_seconds(node: fx.Node) -> float:
    """The roofline time of one node: arithmetic plus bytes read and written."""
    if node.op != "call_function" or node.target is operator.getitem or is_view(node):
        return 0.0
    moved = _bytes(node.meta.get("val")) + sum(_bytes(arg.meta.get("val"))
                                               for arg in node.all_input_nodes)
    return remat.flops(node) / DEVICE_FLOPS + moved / DEVICE_BYTES


def copy_seconds(nbytes: int) -> float:
    return nbytes / PCIE_BYTES


def dear(node: fx.Node, support) -> bool:
    """Not cheap to recompute by the checkpoint's default rule: a random or
    impure op, or one codegen does not lower (matrix products, convolutions,
    attention and the other extern ops)."""
    if not is_pure(node):
        return True
    if node.target is operator.getitem or is_view(node):
        return False
    return not (torch.Tag.pointwise in getattr(node.target, "tags", ())
                or support.can_lower(node) or support.can_reduce(node))


def _out_fits(chosen: list[Candidate], forward_seconds: float) -> bool:
    """Copies out, in order of readiness on one link, all end by the forward's end."""
    link = 0.0
    for candidate in sorted(chosen, key=lambda c: c.ready):
        link = max(link, candidate.ready) + copy_seconds(candidate.nbytes)
        if link > forward_seconds:
            return False
    return True


def latest_starts(chosen: list[Candidate]) -> dict[str, float]:
    """When each copy back starts if scheduled as late as possible on one
    link, every copy ending by its deadline (negative: not in time)."""
    starts, link = {}, float("inf")
    for candidate in sorted(chosen, key=lambda c: -c.deadline):
        finish = min(link, candidate.deadline)
        link = starts[candidate.name] = finish - copy_seconds(candidate.nbytes)
    return starts


def feasible(chosen: list[Candidate], forward_seconds: float) -> bool:
    """Every copy hides behind compute: out within the forward, back in time."""
    return _out_fits(chosen, forward_seconds) and all(
        start >= 0 for start in latest_starts(chosen).values())


def choose(candidates: list[Candidate], forward_seconds: float) -> list[Candidate]:
    """The automatic plan: dear candidates of at least ``MIN_BYTES``, largest
    first, each kept while the plan stays ``feasible``."""
    chosen: list[Candidate] = []
    for candidate in sorted(candidates, key=lambda c: (-c.nbytes, c.name)):
        if candidate.dear and candidate.nbytes >= MIN_BYTES and \
                feasible(chosen + [candidate], forward_seconds):
            chosen.append(candidate)
    return chosen
