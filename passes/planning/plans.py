"""The local search's view of rematerialization plans, for ``remat_search``.

``Plans`` holds one plan as the set of recomputed forward values (by index)
and evaluates it incrementally: moves change it and ``undo`` restores it, so
the Pareto local search tries a move for the cost of what it touches.
``Plans.lagrangian`` is the minimum cut the parametric search asks for.
``Frontier`` keeps the plans no other beats on both saved bytes and
recompute cost.
"""

from __future__ import annotations

import bisect
import math

from retrograd.passes.planning.remat import JointInfo, recompute_cost, value_bytes

__all__ = ["Plans", "Frontier"]


class Plans:
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
        recomputable, unsavable = info.predicates(recomputable, unsavable)
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

    def recompute(self, v: int) -> None:
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
            self.recompute(v)
            return
        if kind == "deep":
            self._mark(v, self.inputs, lambda a: True)
            self.recompute(v)
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
            self.recompute(y)

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

    def pieces(self, values: list[int]) -> list[list[int]]:
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
                for w in self.inputs[v] + self.readers[v]:
                    if w in inside and w not in seen:
                        seen.add(w)
                        stack.append(w)
            pieces.append(sorted(piece))
        return pieces

    def recompute_all(self, values: list[int]) -> None:
        """Recompute ``values`` (a logged move): the live ones now, the others
        when they become live."""
        self.log, self.before = [], (self.bytes, self.work, self.bad)
        for v in values:
            if not self.users[v]:
                self._set(self.in_r, v, True)
        for v in values:
            if self.users[v] and not self.in_r[v]:
                self.recompute(v)
        for v in values:
            if not self.users[v] and self.in_r[v]:
                self._set(self.in_r, v, False)

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
        # products at saveable values only: an unsaveable one's size is inf, and
        # inf * a weight of 0 warned (a nan, then discarded)
        capacity[sized[saveable]] = np.broadcast_to(weight, (n,))[saveable] * size[saveable]
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


class Frontier:
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
