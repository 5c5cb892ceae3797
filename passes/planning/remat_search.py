"""Budgeted rematerialization for graphs too large for the exact solver.

``tradeoff`` lists, without looking at any budget, plans that no other beats
on both saved bytes and recompute cost: the lower convex hull of the two
(minimum cuts of cost + weight x bytes, a parametric search over the weight),
the pieces between neighbouring hull plans and cuts mixing their weights,
then a Pareto local search (save a recomputed value, recompute a saved one
shallow or deep, or save one value to recompute the saved values it feeds)
under a work bound. ``greedy_plan`` picks the cheapest listed plan that fits
the budget; since the list does not depend on the budget, tighter budgets
never save more bytes nor recompute less. Compared against the exact ILP of
``remat.py`` in tests/test_checkpoint.py (within 5% on the zoo). The plans
it searches over, evaluated incrementally, and the frontier are ``plans.py``.
"""

from __future__ import annotations

import bisect
from collections import deque

from retrograd.passes.planning.plans import Frontier, Plans
from retrograd.passes.planning.remat import JointInfo, Plan, min_cut_plan, needed_closure

__all__ = ["tradeoff", "greedy_plan"]


#: Work (moves tried plus values they touch) the local search may spend; it
#: bounds the greedy's time on large graphs (about a second per million on a CPU).
GREEDY_WORK = 3_000_000


def tradeoff(info: JointInfo, recomputable, unsavable=lambda node: False,
             max_cuts: int = 64, splits: int = 8,
             max_work: int = GREEDY_WORK) -> tuple[Plans, Frontier]:
    """Plans trading saved bytes for recompute cost, none beaten on both;
    computed without a budget, so every budget picks from the same list.
    ``max_cuts`` bounds the minimum cuts of phases 1 and 3 (each), ``max_work``
    the local search. Four phases, each adding to one ``_Search``."""
    search = _Search(Plans(info, recomputable, unsavable))
    hull = _hull(search, max_cuts)
    _between_neighbours(search, hull)
    _mixed_cuts(search, hull, max_cuts, splits)
    _local_search(search, max_work)
    return search.plans, search.frontier


class _Search:
    """What the phases of ``tradeoff`` share: the plan being evaluated, the
    frontier found so far, and the frontier plans the local search still has
    to start from."""

    def __init__(self, plans: Plans):
        self.plans, self.frontier, self.todo = plans, Frontier(), deque()

    def add(self) -> None:
        """Keep the current plan if it is valid and nothing found beats it."""
        plans = self.plans
        if not plans.bad and not self.frontier.beaten(round(plans.bytes, 6),
                                                      round(plans.work, 6)):
            point = plans.point()
            self.frontier.insert(point)
            self.todo.append(point)

    def cut(self, weight) -> tuple | None:
        """Load and keep the minimum cut at ``weight``; its point if valid."""
        self.plans.load(self.plans.lagrangian(weight))
        self.add()
        return None if self.plans.bad else self.plans.point()


def _hull(search: _Search, max_cuts: int) -> list[tuple]:
    """Phase 1: the lower convex hull of (bytes, cost): minimum cuts of cost +
    weight x bytes at the weights where two known hull plans tie (Eisner and
    Severance's parametric search). Returns the hull by bytes descending."""
    plans = search.plans
    plans.load(())
    search.add()
    first = None if plans.bad else plans.point()
    last = search.cut(sum(plans.cost) + 1.0)
    segments = [(first, last)] if first and last and first[0] > last[0] else []
    cuts = 1
    while segments and cuts < max_cuts:
        a, b = segments.pop()
        weight = (b[1] - a[1]) / (a[0] - b[0])
        point = search.cut(weight)
        cuts += 1
        tied = a[1] + weight * a[0]
        if point and a[0] > point[0] > b[0] and point[1] + weight * point[0] < tied * (1 - 1e-9):
            segments += [(a, point), (point, b)]
    return sorted(search.frontier.points, key=lambda point: -point[0])


def _between_neighbours(search: _Search, hull: list[tuple]) -> None:
    """Phase 2: between two neighbouring hull plans, recompute the difference
    piece by piece: each connected piece by bytes freed per cost, and value
    by value in graph order and in reverse (a layer at a time, in a stack)."""
    plans = search.plans
    for a, b in zip(hull, hull[1:]):
        difference = sorted(b[2] - a[2])
        plans.load(a[2])
        scored = []
        for piece in plans.pieces(difference):
            before = plans.bytes, plans.work
            plans.recompute_all(piece)
            freed, added = before[0] - plans.bytes, plans.work - before[1]
            plans.undo()
            if freed > 0:
                scored.append((-freed / max(added, 1e-9), piece))
        for _, piece in sorted(scored, key=lambda item: item[0]):
            plans.recompute_all(piece)
            plans.log = None
            search.add()
        for order in (difference, difference[::-1]):
            plans.load(a[2])
            for v in order:
                if plans.users[v] and not plans.in_r[v]:
                    plans.recompute(v)
                    search.add()
                else:
                    plans.in_r[v] = True


def _mixed_cuts(search: _Search, hull: list[tuple], max_cuts: int, splits: int) -> None:
    """Phase 3: minimum cuts with two hull neighbours' tie weight nudged apart
    on either side of a split point: one end's choices before it, the other's
    after it (in a stack of layers, some layers each way)."""
    import numpy as np

    position = np.arange(len(search.plans.nodes))
    mixed = 0
    for a, b in sorted(zip(hull, hull[1:]), key=lambda pair: pair[1][0] - pair[0][0]):
        difference = sorted(a[2] ^ b[2])
        weight = (b[1] - a[1]) / (a[0] - b[0])
        for step in range(1, splits if len(difference) > 1 else 1):
            early = position < difference[step * len(difference) // splits]
            for first_half in (early, ~early):
                if mixed < max_cuts:
                    search.cut(np.where(first_half, weight * (1 - 1e-3), weight * (1 + 1e-3)))
                    mixed += 1


def _local_search(search: _Search, max_work: int) -> None:
    """Phase 4: Pareto local search from every plan kept: single moves,
    keeping the plans no other beats, breadth first until the work bound."""
    plans, work = search.plans, 0
    while search.todo and work < max_work:
        point = search.todo.popleft()
        if not search.frontier.holds(point):
            continue
        plans.load(point[2])
        work += len(plans.nodes)
        for v, kind in list(plans.moves()):
            plans.apply(v, kind)
            work += 1 + len(plans.log)
            search.add()
            plans.undo()


def greedy_plan(info: JointInfo, budget: float, recomputable,
                unsavable=lambda node: False) -> Plan:
    """The least-cost plan within ``budget`` among ``tradeoff``'s (the
    least-bytes one if none fits)."""
    plans, frontier = tradeoff(info, recomputable, unsavable)
    if not frontier.points:
        return min_cut_plan(info, recomputable, unsavable)
    k = bisect.bisect_right(frontier.bytes, budget)
    plans.load(frontier.points[max(k - 1, 0)][2])
    recomputed = {node for node, chosen, users in zip(plans.nodes, plans.in_r, plans.users)
                  if chosen and users}
    saved = {node for node, chosen, users in zip(plans.nodes, plans.in_r, plans.users)
             if users and not chosen}
    return Plan(saved, needed_closure(info, saved, recomputed),
                "greedy (min-cut hull, Pareto local search)", False)
