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
``remat.py`` in tests/test_checkpoint.py (within 5% on the zoo).
"""

from __future__ import annotations

import bisect
import math
from collections import deque


from retrograd.passes.planning.remat import (JointInfo, Plan, _needed_closure, min_cut_plan,
                                             recompute_cost, value_bytes)

__all__ = ["tradeoff", "greedy_plan"]


class _Plans:
    """Plans as the set of recomputed forward values (by index), evaluated
    incrementally for the local search.

    A value is *live* while the backward reads it or a live recomputed value
    does (``users`` counts those readers); a live value is recomputed (costs
    its recompute cost) or saved (costs its bytes). Values that cannot be
    saved (tuples, the user's "recompute") are recomputed whenever live;
    ``bad`` counts live values that can be neither. Moves log what they
    change so ``undo`` restores the plan they started from.
    """

    def __init__(self, info: JointInfo, recomputable, unsavable):
        nodes = info.forward
        index = {node: i for i, node in enumerate(nodes)}
        self.nodes = nodes
        self.inputs = [sorted({index[a] for a in info.inputs_of(node) if a in index})
                       for node in nodes]
        self.readers = [[] for _ in nodes]
        for i, inputs in enumerate(self.inputs):
            for a in inputs:
                self.readers[a].append(i)
        self.size = [0.0 if node in info.free else value_bytes(node) for node in nodes]
        self.cost = [recompute_cost(node) for node in nodes]
        self.recomputable = [bool(recomputable(node)) for node in nodes]
        self.must = [math.isinf(size) or (allowed and bool(unsavable(node)))
                     for node, size, allowed in zip(nodes, self.size, self.recomputable)]
        self.needed = [i for i, node in enumerate(nodes) if node in info.needed]
        self.cut_edges = None
        self.log: list | None = None
        self.load(())

    def load(self, recomputed) -> None:
        self.users = [0] * len(self.nodes)
        self.in_r = [False] * len(self.nodes)
        for i in recomputed:
            self.in_r[i] = True
        self.bytes = self.work = 0.0
        self.bad = 0
        self.log = None
        self._use(self.needed)

    def point(self) -> tuple[float, float, frozenset]:
        """(saved bytes, recompute cost, recompute set) of the current plan."""
        return (round(self.bytes, 6), round(self.work, 6),
                frozenset(i for i, chosen in enumerate(self.in_r) if chosen and self.users[i]))

    def _set(self, array: list, i: int, value) -> None:
        if self.log is not None:
            self.log.append((array, i, array[i]))
        array[i] = value

    def _use(self, stack) -> None:
        stack = list(stack)
        while stack:
            i = stack.pop()
            self._set(self.users, i, self.users[i] + 1)
            if self.users[i] != 1:
                continue
            if self.in_r[i] or (self.must[i] and self.recomputable[i]):
                self._set(self.in_r, i, True)
                self.work += self.cost[i]
                stack.extend(self.inputs[i])
            elif self.must[i]:
                self.bad += 1
            else:
                self.bytes += self.size[i]

    def _release(self, stack) -> None:
        stack = list(stack)
        while stack:
            i = stack.pop()
            self._set(self.users, i, self.users[i] - 1)
            if self.users[i] != 0:
                continue
            if self.in_r[i]:
                self._set(self.in_r, i, False)
                self.work -= self.cost[i]
                stack.extend(self.inputs[i])
            elif self.must[i]:
                self.bad -= 1
            else:
                self.bytes -= self.size[i]

    def _recompute(self, v: int) -> None:
        """Live, saved ``v`` becomes recomputed; what it reads becomes live."""
        self._set(self.in_r, v, True)
        self.bytes -= self.size[v]
        self.work += self.cost[v]
        self._use(self.inputs[v])

    def moves(self):
        """Each move as (value, kind): "save" a live recomputed value (what only
        it needed is dropped); "recompute" a saved one, what it reads and
        nothing keeps being saved, or "deep": recomputed as far as it goes;
        "pivot": save a value and recompute every saved value it reaches
        through values nothing keeps (two outputs of one input)."""
        for v, users in enumerate(self.users):
            if users and not self.must[v]:
                if self.in_r[v]:
                    yield v, "save"
                elif self.recomputable[v]:
                    yield v, "recompute"
                    if any(not self.users[a] and self.recomputable[a] for a in self.inputs[v]):
                        yield v, "deep"
            if not (users and self.in_r[v]) and self.readers[v]:
                yield v, "pivot"

    def apply(self, v: int, kind: str) -> None:
        self.log, self.before = [], (self.bytes, self.work, self.bad)
        if kind == "save":
            self._set(self.in_r, v, False)
            self.bytes += self.size[v]
            self.work -= self.cost[v]
            self._release(self.inputs[v])
            return
        if kind == "recompute":
            self._recompute(v)
            return
        if kind == "deep":
            self._mark(v, self.inputs, lambda a: True)
            self._recompute(v)
            return
        reached, stack = set(), [v]          # pivot
        while stack:
            for y in self.readers[stack.pop()]:
                if y not in reached and self.recomputable[y] and not (
                        self.users[y] and self.in_r[y]):
                    reached.add(y)
                    if not self.users[y]:
                        stack.append(y)
        targets = sorted(y for y in reached if self.users[y] and not self.must[y])
        for y in targets:
            self._mark(y, self.inputs, reached.__contains__)
        for y in targets:
            self._recompute(y)

    def _mark(self, v: int, edges, allowed) -> None:
        """Mark for recomputation the values ``v`` reads that nothing keeps,
        transitively (they are recomputed when they become live)."""
        stack = [v]
        while stack:
            for a in edges[stack.pop()]:
                if (not self.users[a] and not self.in_r[a] and self.recomputable[a]
                        and allowed(a)):
                    self._set(self.in_r, a, True)
                    stack.append(a)

    def undo(self) -> None:
        for array, i, old in reversed(self.log):
            array[i] = old
        self.log = None
        self.bytes, self.work, self.bad = self.before

    def lagrangian(self, weight) -> frozenset:
        """The recompute set of least ``cost + weight * bytes``: a minimum cut
        as in ``min_cut_plan`` with each recomputable value also hanging off
        the source at its recompute cost (scipy's max-flow; capacities scaled
        to int32, so ties and tiny costs may round). ``weight`` is one number
        or one per value."""
        import numpy as np
        from scipy.sparse import csr_matrix
        from scipy.sparse.csgraph import breadth_first_order, maximum_flow

        n = len(self.nodes)
        source, sink = 2 * n, 2 * n + 1     # value k: "in" k, "out" n + k
        if self.cut_edges is None:
            rows, columns, capacity = [], [], []
            for k in range(n):
                rows += [k, source]
                columns += [n + k, k]
                capacity += [math.inf if self.must[k] else 0.0,
                             self.cost[k] if self.recomputable[k] else math.inf]
                for a in self.inputs[k]:
                    rows.append(n + a)
                    columns.append(k)
                    capacity.append(math.inf)
            for k in self.needed:
                rows.append(n + k)
                columns.append(sink)
                capacity.append(math.inf)
            sized = [position for position, row in enumerate(rows) if row < n]
            self.cut_edges = (np.array(rows), np.array(columns), np.array(capacity),
                              np.array(sized), np.array(self.size))
        rows, columns, capacity, sized, size = self.cut_edges
        capacity = capacity.copy()
        saveable = np.isfinite(capacity[sized])
        capacity[sized[saveable]] = (np.broadcast_to(weight, (n,)) * size)[saveable]
        finite = np.isfinite(capacity)
        total = capacity[finite].sum()
        limit = 2 ** 30
        scale = (limit - 1) / total if total > 0 else 1.0
        scaled = np.where(finite, np.floor(np.where(finite, capacity, 0.0) * scale), limit)
        matrix = csr_matrix((scaled.astype(np.int32), (rows, columns)),
                            shape=(2 * n + 2, 2 * n + 2))
        flow = maximum_flow(matrix, source, sink, method="dinic").flow
        residual = (matrix - flow).tocsr()
        residual.data[residual.data < 0] = 0
        residual.eliminate_zeros()
        reached = np.zeros(2 * n + 2, dtype=bool)
        reached[breadth_first_order(residual, source, return_predecessors=False)] = True
        return frozenset(np.flatnonzero(~reached[:n]).tolist())


class _Frontier:
    """Plans that no other plan beats on both saved bytes and recompute cost,
    by bytes ascending (so by cost descending)."""

    def __init__(self):
        self.bytes: list[float] = []
        self.costs: list[float] = []
        self.points: list[tuple] = []

    def beaten(self, saved_bytes: float, cost: float) -> bool:
        k = bisect.bisect_right(self.bytes, saved_bytes)
        return bool(k) and self.costs[k - 1] <= cost

    def insert(self, point: tuple) -> bool:
        saved_bytes, cost, _ = point
        if self.beaten(saved_bytes, cost):
            return False
        k = end = bisect.bisect_left(self.bytes, saved_bytes)
        while end < len(self.bytes) and self.costs[end] >= cost:
            end += 1
        self.bytes[k:end], self.costs[k:end], self.points[k:end] = (
            [saved_bytes], [cost], [point])
        return True

    def holds(self, point: tuple) -> bool:
        k = bisect.bisect_left(self.bytes, point[0])
        return k < len(self.bytes) and self.points[k] is point


#: Work (moves tried plus values they touch) the local search may spend; it
#: bounds the greedy's time on large graphs (about a second per million on a CPU).
GREEDY_WORK = 3_000_000


def tradeoff(info: JointInfo, recomputable, unsavable=lambda node: False,
             max_cuts: int = 64, splits: int = 8,
             max_work: int = GREEDY_WORK) -> tuple[_Plans, _Frontier]:
    """Plans trading saved bytes for recompute cost, none beaten on both;
    computed without a budget, so every budget picks from the same list.
    ``max_cuts`` bounds the minimum cuts of phases 1 and 3 (each), ``max_work``
    the local search. Four phases, each adding to one ``_Search``."""
    search = _Search(_Plans(info, recomputable, unsavable))
    hull = _hull(search, max_cuts)
    _between_neighbours(search, hull)
    _mixed_cuts(search, hull, max_cuts, splits)
    _local_search(search, max_work)
    return search.plans, search.frontier


class _Search:
    """What the phases of ``tradeoff`` share: the plan being evaluated, the
    frontier found so far, and the frontier plans the local search still has
    to start from."""

    def __init__(self, plans: _Plans):
        self.plans, self.frontier, self.todo = plans, _Frontier(), deque()

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
        for piece in _pieces(plans, difference):
            before = plans.bytes, plans.work
            _recompute_all(plans, piece)
            freed, added = before[0] - plans.bytes, plans.work - before[1]
            plans.undo()
            if freed > 0:
                scored.append((-freed / max(added, 1e-9), piece))
        for _, piece in sorted(scored, key=lambda item: item[0]):
            _recompute_all(plans, piece)
            plans.log = None
            search.add()
        for order in (difference, difference[::-1]):
            plans.load(a[2])
            for v in order:
                if plans.users[v] and not plans.in_r[v]:
                    plans._recompute(v)
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


def _pieces(plans: _Plans, values: list[int]) -> list[list[int]]:
    """``values`` split into weakly connected pieces."""
    inside, seen, pieces = set(values), set(), []
    for start in values:
        if start in seen:
            continue
        seen.add(start)
        piece, stack = [], [start]
        while stack:
            v = stack.pop()
            piece.append(v)
            for w in plans.inputs[v] + plans.readers[v]:
                if w in inside and w not in seen:
                    seen.add(w)
                    stack.append(w)
        pieces.append(sorted(piece))
    return pieces


def _recompute_all(plans: _Plans, values: list[int]) -> None:
    """Recompute ``values`` (a logged move): the live ones now, the others
    when they become live."""
    plans.log, plans.before = [], (plans.bytes, plans.work, plans.bad)
    for v in values:
        if not plans.users[v]:
            plans._set(plans.in_r, v, True)
    for v in values:
        if plans.users[v] and not plans.in_r[v]:
            plans._recompute(v)
    for v in values:
        if not plans.users[v] and plans.in_r[v]:
            plans._set(plans.in_r, v, False)


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
    return Plan(saved, _needed_closure(info, saved, recomputed),
                "greedy (min-cut hull, Pareto local search)", False)
