"""Runs a symbolic program's half with the memory plan of symbolic_plan.py.

``ArenaRunner`` interprets the half's fx graph node by node: at each call it
asks the planner (``SizedPlanner``) for the plan of this call's sizes,
allocates each arena (``runtime/arena.py``) before its first node and drops
it after its last, calls each planned op's ``out=`` overload (or
size-generic kernel's launcher) into its arena view, writes donated updates
over the inputs they replace (symbolic_donation.py), and drops every value
after its last use, as the fx program does. Split out of symbolic_plan.py,
which keeps the analysis and the per-size plan; no behaviour change.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from retrograd.runtime.arena import Arena
from retrograd.symbolic_kernel_slots import kernel_outputs
from retrograd.symbolic_plan import SizedPlan, SizedPlanner, _out_form
from torch import fx

__all__ = ["ArenaRunner"]


class ArenaRunner:
    """Runs a half's graph with its arenas sized for this call's sizes: each
    allocated before its first node and dropped after its last (its views
    die with their last readers). ``donation`` (symbolic_donation.py): update
    values written over the inputs they replace."""

    def __init__(self, gm: fx.GraphModule, donation=None):
        self.donation = donation
        written = donation.written if donation is not None else frozenset()
        self.gm, self.planner = gm, SizedPlanner(gm, written)
        nodes = list(gm.graph.nodes)
        last = {}
        for i, node in enumerate(nodes):
            for arg in node.all_input_nodes:
                last[arg] = i
        self.steps = [(node, _out_form(node.target) if node.name in self.planner.values
                       else None, [a for a in node.all_input_nodes if last[a] == i])
                      for i, node in enumerate(nodes)]
        self.kernel_outputs = kernel_outputs(nodes, self.planner.values)
        self.last_plan: SizedPlan | None = None

    def __call__(self, args: list) -> Any:
        values = list(args)
        if isinstance(args, list):
            args.clear()   # the caller's list no longer holds the inputs (boxed convention)
        plan = self.last_plan = self.planner.plan(self.planner.symbols(values))
        targets = self.donation.targets(values) if self.donation else {}
        device = _device(values)
        opening = {start: [] for start, _, _ in plan.windows}
        for number, (start, _, _) in enumerate(plan.windows):
            opening[start].append(number)
        arenas: dict[int, Arena] = {}
        env: dict[fx.Node, Any] = {}
        inputs = iter(values)
        del values
        for index, (node, out, dying) in enumerate(self.steps):
            for number in opening.get(index, ()):
                arenas[number] = Arena(plan.windows[number][2], device)
            if node.op == "placeholder":
                env[node] = next(inputs)
            elif node.op == "get_attr":
                env[node] = operator.attrgetter(node.target)(self.gm)
            elif node.op == "output":
                return fx.map_arg(node.args[0], env.__getitem__)
            else:
                env[node] = self._call(node, out, env, plan, arenas, targets)
            for arg in dying:
                env.pop(arg, None)
            for number in [n for n in arenas if plan.windows[n][1] <= index]:
                del arenas[number]
        raise AssertionError("retrograd: a graph without an output node")

    def _call(self, node: fx.Node, out: Any, env: dict, plan: SizedPlan, arenas: dict,
              targets: dict) -> Any:
        """The node's op: its ``out=`` form into its arena slot when planned,
        or over the input it replaces when donated and this call allows."""
        positional = fx.map_arg(node.args, env.__getitem__)
        keywords = fx.map_arg(node.kwargs, env.__getitem__)
        items = self.kernel_outputs.get(node.name)
        if items is not None:
            return self._kernel(node, positional, keywords, items, plan, arenas, targets)
        if targets:
            written = self.donation.call(node, targets)
            if written is not None:
                return written(positional, keywords)
        place = plan.offsets.get(node.name) if out is not None else None
        if place is None:
            return node.target(*positional, **keywords)
        shape = plan.shapes[node.name]
        view = arenas[place[0]].view(place[1], shape, _strides(shape), node.meta["val"].dtype)
        return out(*positional, **keywords, out=view)


    def _kernel(self, node: fx.Node, positional, keywords, items: list, plan: SizedPlan,
                arenas: dict, targets: dict) -> Any:
        """A size-generic kernel: each output into its arena slot where this
        size's plan has one, or over the input it replaces where donated."""
        given = [None] * len(items)
        for position, name in enumerate(items):
            place = plan.offsets.get(name) if name is not None else None
            if place is not None:
                shape = plan.shapes[name]
                given[position] = arenas[place[0]].view(place[1], shape, _strides(shape),
                                                        self.planner.values[name].dtype)
        donated = self.donation.kernels.get(node.name, {}) if self.donation else {}
        for position, input_position in donated.items():
            if input_position in targets:
                given[position] = targets[input_position]
        if all(g is None for g in given):
            return node.target(*positional, **keywords)
        return node.target(*positional, **keywords, out=given)


def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _device(args: list) -> torch.device:
    return next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
