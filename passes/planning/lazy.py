"""Recomputations run when their reader needs them: the schedule's lazy kernels.

In a compile_step program (one graph), a kernel made only of a checkpoint's
recomputation copies (``RECOMPUTED``, set by
``checkpoint.recompute_in_backward``) reads saved values and inputs only, so
it is ready from the forward on. The schedule's greedy (least added bytes
first) runs a ready kernel as soon as it adds the fewest bytes, which for
such a kernel may be in the forward or early in the backward: its result is
then held from there to its reader, undoing what the checkpoint plan chose
(each copy just before its first backward reader). Measured: once layer
norm's backward was one extern call (bc8ef05, the CPU default), the zoo's
gpt2_tiny step recomputed each norm's output beside the forward's own and
held it to the weight gradient's product: step peak 101,056 -> 109,760 bytes.

So these kernels are *lazy*: the schedule never picks one for itself. A
kernel that reads one is a candidate once its other producers have run, and
picking it runs its lazy ancestors not run yet first, in a topological
order: as late as they can run (demand-driven, where
``recompute_in_backward`` put each copy in the graph). Programs without
recomputation copies (the split faces, whose backward program recomputes
on its own; a step whose plan recomputes nothing) have no lazy kernel and
keep the plain greedy.
"""

from __future__ import annotations

import heapq

from retrograd.ir import Program
from retrograd.passes.op_classes import RECOMPUTED

__all__ = ["Demand", "lazy_kernels", "topological"]


def _copies(kernel) -> bool:
    """Every fx node of ``kernel`` is a recomputation copy."""
    nodes = [node for node in kernel.nodes if hasattr(node, "meta")]
    return bool(nodes) and all(RECOMPUTED in node.meta for node in nodes)


def topological(waiting: list[set[int]]) -> list[int]:
    """The kernels in an order where each follows those it waits for (the
    lowest index first among the ready: the program's order where it is one)."""
    pending = [len(producers) for producers in waiting]
    consumers: dict[int, list[int]] = {}
    for index, producers in enumerate(waiting):
        for producer in producers:
            consumers.setdefault(producer, []).append(index)
    heap = [i for i, count in enumerate(pending) if not count]
    heapq.heapify(heap)
    order = []
    while heap:
        index = heapq.heappop(heap)
        order.append(index)
        for consumer in consumers.get(index, []):
            pending[consumer] -= 1
            if not pending[consumer]:
                heapq.heappush(heap, consumer)
    if len(order) != len(waiting):
        raise RuntimeError("schedule: the kernel graph has a cycle")
    return order


def lazy_kernels(program: Program) -> set[int]:
    """The kernels made of recomputation copies only (``RECOMPUTED``)."""
    return {index for index, kernel in enumerate(program.kernels) if _copies(kernel)}


class Demand:
    """Which kernels a demand-driven order may pick, and what picking one runs.

    ``needs[i]``: the kernels that are not lazy ``i`` waits for, directly or
    through lazy kernels; ``closure[i]``: the lazy kernels it reads through,
    in a topological order; ``needed_by``: the inverse of ``needs``."""

    def __init__(self, waiting: list[set[int]], lazy: set[int], order: list[int]):
        self.lazy, self.order = lazy, order
        position = {index: rank for rank, index in enumerate(order)}
        self.needs: list[set[int]] = [set() for _ in waiting]
        closures: list[set[int]] = [set() for _ in waiting]
        for index in order:
            for producer in waiting[index]:
                if producer in lazy:
                    self.needs[index] |= self.needs[producer]
                    closures[index] |= {producer, *closures[producer]}
                else:
                    self.needs[index].add(producer)
        self.closure = [sorted(c, key=position.__getitem__) for c in closures]
        self.needed_by: dict[int, list[int]] = {}
        for index, needs in enumerate(self.needs):
            for producer in needs:
                self.needed_by.setdefault(producer, []).append(index)

    def pending(self, index: int, done: set[int]) -> list[int]:
        """The lazy kernels picking ``index`` runs first, then ``index``."""
        return [i for i in self.closure[index] if i not in done] + [index]
