"""The peak guard's solver results, kept per graph for later compiles.

``budget.plan_for_budget`` walks the same levels for every budget (that is
what makes its guarantee hold between any two budgets), so compiling one
graph under several budgets (a Pareto sweep, a benchmark, the tests) solves
the same exact programs again. This memo keeps, per *planning problem*, the
solver's plan at each level and the trade-off's frontier, as node names.

The key is a digest of everything the solver and the frontier read: every
node of the graph as fx prints it (op, target, arguments, user count), its
value's shape, dtype and strides, the planner's sets (needed, free, once,
fills, aliases, primals), the policy's answers per forward node, the
save-all bytes, whether the exact solver runs, and the walk's constants.
Two compiles with the same key pose the same problem, and the solvers are
deterministic on it, so a kept result is the one a new solve would return
(an ILP stopped by its time limit excepted: then the memo makes the later
compiles agree with the first). A bounded LRU: ``SIZE`` problems.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from retrograd.passes.planning import remat
from torch import fx

__all__ = ["SIZE", "Memo", "clear", "problem_key"]

SIZE = 16

_PROBLEMS: OrderedDict[str, dict] = OrderedDict()


def _value(node: fx.Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return f"{tuple(val.shape)}|{val.dtype}|{val.stride()}"
    return repr(type(val).__name__)


def problem_key(graph: fx.Graph, info: remat.JointInfo, policy, save_all: float,
                constants: tuple) -> str:
    """The digest of one planning problem (module docstring)."""
    digest = hashlib.sha1()
    for node in graph.nodes:
        digest.update(f"{node.format_node()}|{_value(node)}\n".encode())
    sets = (info.needed, info.free, info.once, info.fills)
    for node in info.forward:
        flags = [node in s for s in sets] + [policy.any(node), policy.forced_recompute(node)]
        alias = info.aliases.get(node)
        digest.update(f"{node.name}|{flags}|{alias.name if alias else ''}\n".encode())
    digest.update(f"{[n.name for n in info.primals]}|{save_all!r}|{constants!r}".encode())
    return digest.hexdigest()


def clear() -> None:
    _PROBLEMS.clear()


def _names(plan: remat.Plan) -> tuple:
    return (frozenset(n.name for n in plan.saved), frozenset(n.name for n in plan.recomputed),
            plan.solver, plan.optimal)


class Memo:
    """One problem's kept results; plans come back as nodes of ``graph``."""

    def __init__(self, key: str, graph: fx.Graph):
        self.by_name = {node.name: node for node in graph.nodes}
        if key in _PROBLEMS:
            _PROBLEMS.move_to_end(key)
        else:
            _PROBLEMS[key] = {"solve": {}, "frontier": None}
            while len(_PROBLEMS) > SIZE:
                _PROBLEMS.popitem(last=False)
        self.kept = _PROBLEMS[key]

    def _plan(self, names) -> remat.Plan:
        saved, recomputed, solver, optimal = names
        return remat.Plan({self.by_name[n] for n in saved},
                          {self.by_name[n] for n in recomputed}, solver, optimal)

    def solve(self, level: float, solver):
        """``solver(level)``'s plan (or None), solved once per problem and level."""
        if level not in self.kept["solve"]:
            plan = solver(level)
            self.kept["solve"][level] = None if plan is None else _names(plan)
        names = self.kept["solve"][level]
        return None if names is None else self._plan(names)

    def frontier(self, make) -> list[remat.Plan]:
        """``make()``'s plans, made once per problem."""
        if self.kept["frontier"] is None:
            self.kept["frontier"] = [_names(plan) for plan in make()]
        return [self._plan(names) for names in self.kept["frontier"]]
