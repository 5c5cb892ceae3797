"""Rematerialization planning: which forward values the backward gets saved,
and which it recomputes.

The joint graph's forward part is a DAG of values. A *plan* marks some of them
saved (kept from the forward for the backward) and some recomputed (evaluated
again in the backward from saved values and inputs). A plan is valid when
every value the backward reads is saved or recomputed, and everything a
recomputed value reads is too (inputs are always there).

Three planners:

- ``min_cut_plan``: the fewest saved bytes, recomputing only what
  ``recomputable`` allows. The classic reduction (Checkmate, Jain et al.,
  MLSys 2020; AOTAutograd's ``min_cut_rematerialization_partition``): each
  value v becomes an edge v_in -> v_out whose capacity is its size; data
  edges and edges into values that may not be recomputed are infinite; the
  backward's needs drain into the sink. A minimum s-t cut (networkx
  max-flow) is a set of values to save, and what lies past it is recomputed.
- ``ilp_plan``: for ``memory_budget``: least recompute cost with saved bytes
  at most the budget, as a 0-1 integer program (scipy's HiGHS ``milp``).
  Exact; used on graphs small enough to solve quickly.
- ``greedy_plan`` (in ``remat_search.py``, which imports this module and
  not the other way round): the same question answered fast for large
  graphs, from a budget-independent list of plans trading saved bytes
  against recompute cost.

Two max-flow solvers, on purpose. ``min_cut_plan`` runs once per graph and
must be exact: float byte capacities and infinite edges, as networkx takes
them. ``remat_search``'s parametric search solves up to 128 cuts per graph,
so it uses scipy's integer Dinic on capacities scaled to int32 (about 20x
faster: 3 ms against 59 ms a cut on gpt2_tiny's joint graph); the rounding
there only proposes candidate plans, each then costed exactly. On scipy,
``min_cut_plan`` would break ties by rounded bytes and could save more.

Cost model (documented in docs/design.md): recomputing a value costs its
FLOPs (2mnk for matrix products, 2 x output x window for convolutions, one
per output element otherwise, one per input element for reductions) plus one
unit per 4 bytes it reads and writes.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx

from retrograd.passes.op_classes import is_pure, is_view

__all__ = ["JointInfo", "Plan", "analyse", "backward_nodes", "value_bytes", "flops",
           "recompute_cost", "min_cut_plan", "ilp_plan", "save_all_plan", "plan_bytes",
           "needed_closure", "storage_base", "storage_bytes", "extra_flops",
           "FREE_TO_RECOMPUTE"]

aten = torch.ops.aten

#: node.meta key ``analyse`` sets on forward values that cost nothing to
#: recompute under any plan: views, fills and ``once`` values (``JointInfo``).
FREE_TO_RECOMPUTE = "retrograd.free_to_recompute"

MATMULS = {aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default,
           aten.convolution.default, aten._scaled_dot_product_flash_attention.default,
           aten._scaled_dot_product_efficient_attention.default,
           aten._scaled_dot_product_cudnn_attention.default, aten._scaled_mm.default}


@dataclass
class JointInfo:
    """The forward part of a joint graph, as the planners see it.

    ``once``: forward values no forward output needs (the tangent-free part
    of a backward formula: ``pow(rsqrt, 3)``, cross-entropy's one-hot). Eager
    computes them in the backward, once; a plan that evaluates them there
    spends nothing extra, so their recompute cost is zero. ``aliases``: a
    view (or an item of a multi-output view) -> the value whose storage it
    shares. Saving a view keeps that whole storage alive, so planners never
    save a view: they save its base and recompute the view, and bytes are
    counted per storage. ``fills``: values made from no tensor at all
    (``full``, ``scalar_tensor``, ``arange``): literals in the kernels that
    read them, so never saved either.
    """

    forward: list[fx.Node]          # forward call_function nodes, in graph order
    primals: list[fx.Node]          # forward placeholders: always available
    needed: set[fx.Node]            # forward values the backward reads directly
    free: set[fx.Node] = field(default_factory=set)   # cost nothing to save
    once: set[fx.Node] = field(default_factory=set)
    aliases: dict[fx.Node, fx.Node] = field(default_factory=dict)
    fills: set[fx.Node] = field(default_factory=set)

    def inputs_of(self, node: fx.Node) -> list[fx.Node]:
        return [arg for arg in node.all_input_nodes if arg.op != "get_attr"]

    def storage(self, node: fx.Node) -> fx.Node:
        """The value whose storage ``node`` uses (itself unless a view)."""
        return self.aliases.get(node, node)

    def predicates(self, recomputable, unsavable):
        """A planner's ``recomputable`` and ``unsavable`` widened by the graph's
        structure: ``once`` values may always be evaluated in the backward
        (when pure); views and fills are never saved when recomputable."""
        def can(node):
            return bool(recomputable(node)) or (node in self.once and is_pure(node))

        def cannot(node):
            return bool(unsavable(node)) or (
                (node in self.aliases or node in self.fills) and can(node))
        return can, cannot


@dataclass
class Plan:
    saved: set[fx.Node]
    recomputed: set[fx.Node]
    solver: str
    optimal: bool


def _is_tangent(node: fx.Node) -> bool:
    return node.op == "placeholder" and node.name.startswith("tangents")


def backward_nodes(graph: fx.Graph, is_tangent=_is_tangent) -> set[fx.Node]:
    """The tangents and every node that depends on one."""
    backward: set[fx.Node] = set()
    for node in graph.nodes:
        if is_tangent(node) or any(arg in backward for arg in node.all_input_nodes):
            if node.op != "output":
                backward.add(node)
    return backward


def analyse(joint: fx.GraphModule, num_fwd_outputs: int, free=lambda node: False,
            is_tangent=_is_tangent) -> JointInfo:
    """Split the joint graph's nodes into forward values and their backward readers."""
    backward = backward_nodes(joint.graph, is_tangent)
    output = next(node for node in joint.graph.nodes if node.op == "output")
    grads = [arg for arg in output.args[0][num_fwd_outputs:] if isinstance(arg, fx.Node)]
    forward = [n for n in joint.graph.nodes if n.op == "call_function" and n not in backward]
    primals = [n for n in joint.graph.nodes if n.op == "placeholder" and not is_tangent(n)]
    needed = {arg for node in backward for arg in node.all_input_nodes if arg not in backward}
    needed |= {grad for grad in grads if grad not in backward}
    needed = {n for n in needed if n.op != "get_attr"}
    info = JointInfo(forward, primals, needed)
    info.free = {n for n in forward + primals if free(n)}
    info.once = set(forward) - _forward_region(forward, output)
    info.once |= _rederived(info)
    info.aliases = {n: storage_base(n) for n in forward
                    if n not in info.free and storage_base(n) is not n}
    info.fills = {n for n in forward if not n.all_input_nodes and is_pure(n)
                  and isinstance(n.meta.get("val"), torch.Tensor)}
    for node in forward:    # read by recompute_cost, so every planner sees it
        node.meta[FREE_TO_RECOMPUTE] = node in info.once or node in info.aliases \
            or node in info.fills
    return info


def _forward_region(forward: list[fx.Node], output: fx.Node) -> set[fx.Node]:
    """Forward values some output of the graph needs (the forward outputs,
    the loss), and the items of multi-output values among them (only
    tensors cross to the backward, so an item is the unit a plan saves)."""
    candidates = set(forward)
    region, work = set(), [a for a in output.all_input_nodes if a in candidates]
    while work:
        node = work.pop()
        if node not in region:
            region.add(node)
            work.extend(a for a in node.all_input_nodes if a in candidates)
    region |= {n for n in forward if n.target is operator.getitem and n.args[0] in region}
    return region


def _rederived(info: JointInfo) -> set[fx.Node]:
    """Forward values the backward reads that eager's backward formula makes
    again from another value it reads: a pure pointwise op of one tensor
    whose input the backward reads too (SiLU's ``sigmoid(x)``: silu_backward
    reads ``x`` and computes the sigmoid, which CSE merged with the
    forward's). Counted as ``once``: eager saves only the input."""
    region = set(info.forward) - info.once
    read = {n for n in info.needed if n in region}
    read |= {a for n in info.once for a in info.inputs_of(n) if a in region}
    found = set()
    for node in info.forward:
        inputs = [a for a in info.inputs_of(node) if isinstance(a.meta.get("val"), torch.Tensor)]
        if node in read and len(inputs) == 1 and inputs[0] in read and inputs[0] not in found \
                and is_pure(node) and torch.Tag.pointwise in getattr(node.target, "tags", ()):
            found.add(node)
    return found


def storage_base(node: fx.Node) -> fx.Node:
    """The value whose storage ``node`` shares: through views and items of
    multi-output views (``split(x)[0]``), not through items of other
    multi-output ops (each item of attention's result is its own tensor)."""
    while isinstance(node.args[0] if node.args else None, fx.Node) and (
            is_view(node) or node.target is operator.getitem and is_view(node.args[0])):
        node = node.args[0]
    return node


# ---------------------------------------------------------------- cost model
def value_bytes(node: fx.Node) -> float:
    """Bytes to keep ``node``'s value; infinite for tuples (save their items)."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return float(val.numel() * val.element_size())
    return math.inf


def _numel(value) -> int:
    return value.numel() if isinstance(value, torch.Tensor) else 0


def flops(node: fx.Node) -> int:
    """Floating-point operations to compute ``node`` once."""
    val = node.meta.get("val")
    shapes = [arg.meta.get("val") for arg in node.all_input_nodes]
    target = node.target
    if target in (aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default):
        a = shapes[-2] if target in (aten.addmm.default, aten.baddbmm.default) else shapes[0]
        return 2 * _numel(val) * a.shape[-1]
    if target is aten.convolution.default:
        weight = shapes[1]
        return 2 * _numel(val) * (weight.numel() // max(1, weight.shape[0]))
    if target is operator.getitem:
        return 0
    largest_input = max([_numel(s) for s in shapes] + [0])
    if isinstance(val, (tuple, list)) or _numel(val) < largest_input:   # a reduction
        return largest_input
    return _numel(val)


def extra_flops(node: fx.Node) -> int:
    """FLOPs a plan that recomputes ``node`` spends beyond eager's: none for
    a value marked ``FREE_TO_RECOMPUTE``."""
    return 0 if node.meta.get(FREE_TO_RECOMPUTE) else flops(node)


def recompute_cost(node: fx.Node) -> float:
    """FLOPs plus one unit per 4 bytes read and written; zero for a value
    ``analyse`` marked ``FREE_TO_RECOMPUTE`` (a view, a ``once`` value)."""
    if node.meta.get(FREE_TO_RECOMPUTE):
        return 0.0
    moved = sum(_numel(a.meta.get("val")) * a.meta["val"].element_size()
                for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor))
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        moved += val.numel() * val.element_size()
    return flops(node) + moved / 4


def plan_bytes(info: JointInfo, saved) -> float:
    """Bytes a plan keeps: once per storage (a saved view keeps its base's)."""
    kept = {info.storage(n) for n in saved}
    return sum(value_bytes(n) for n in kept if n not in info.free and n not in info.primals)


def storage_bytes(nodes) -> int:
    """Bytes of the distinct storages ``nodes`` keep alive (a view counts as
    its base), as ``saved_tensors_hooks`` measures what autograd keeps."""
    bases = {storage_base(n) for n in nodes}
    return int(sum(value_bytes(n) for n in bases if isinstance(n.meta.get("val"), torch.Tensor)))


# ---------------------------------------------------------------- plans
def save_all_plan(info: JointInfo) -> Plan:
    """Eager autograd's plan, at its fewest bytes: nothing recomputed but what
    costs nothing (``FREE_TO_RECOMPUTE``: views and fills made again from
    their base, the values eager's backward makes itself), every other value
    the backward reads saved once per storage. Its bytes are the denominator
    of ``memory_budget``: what torch's ``default_partition`` keeps, measured."""
    plan = min_cut_plan(info, lambda node: bool(node.meta.get(FREE_TO_RECOMPUTE))
                        and is_pure(node))
    return Plan(plan.saved, plan.recomputed, "save everything the backward reads", True)


def min_cut_plan(info: JointInfo, recomputable, unsavable=lambda node: False) -> Plan:
    """Fewest saved bytes, recomputing only nodes ``recomputable`` allows and
    never saving those ``unsavable`` marks (a user's "always recompute")."""
    recomputable, unsavable = info.predicates(recomputable, unsavable)
    graph = nx.DiGraph()
    # both terminals exist even when the backward reads no forward value
    # (the gradient of a sum, a pad or a cat): the cut is then empty
    graph.add_nodes_from(("source", "sink"))
    primals = set(info.primals)
    for node in info.primals + info.forward:
        capacity = 0.0 if node in primals or node in info.free else value_bytes(node)
        if node not in primals and unsavable(node) and recomputable(node):
            capacity = math.inf
        if math.isinf(capacity):
            graph.add_edge((node, "in"), (node, "out"))            # never cut
        else:
            graph.add_edge((node, "in"), (node, "out"), capacity=capacity)
        if node in primals or not recomputable(node):
            graph.add_edge("source", (node, "in"))                 # lives in the forward
        for arg in info.inputs_of(node):
            graph.add_edge((arg, "out"), (node, "in"))
        if node in info.needed:
            graph.add_edge((node, "out"), "sink")
    _, (reachable, _) = nx.minimum_cut(graph, "source", "sink")
    saved = {node for node in info.primals + info.forward
             if (node, "in") in reachable and (node, "out") not in reachable}
    recomputed = {node for node in info.forward if (node, "in") not in reachable
                  and graph.has_node((node, "in"))}
    return Plan(saved, needed_closure(info, saved, recomputed), "min-cut (networkx)", True)


def needed_closure(info: JointInfo, saved, candidates) -> set[fx.Node]:
    """Of ``candidates``, those the backward actually needs recomputed."""
    needed, work = set(), [n for n in info.needed if n not in saved]
    while work:
        node = work.pop()
        if node in needed or node in saved or node.op == "placeholder":
            continue
        if node in candidates:
            needed.add(node)
            work.extend(info.inputs_of(node))
    return needed


def ilp_plan(info: JointInfo, budget: float, recomputable, unsavable=lambda n: False,
             time_limit: float = 20.0) -> Plan | None:
    """Least recompute cost with saved bytes <= ``budget`` (None if infeasible)."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    recomputable, unsavable = info.predicates(recomputable, unsavable)
    nodes = info.forward
    index = {node: i for i, node in enumerate(nodes)}
    n = len(nodes)
    sizes = np.array([0.0 if node in info.free else value_bytes(node) for node in nodes])
    savable = np.isfinite(sizes) & np.array([not unsavable(node) for node in nodes], dtype=bool)
    sizes = np.where(savable, sizes, 0.0)
    costs = np.array([recompute_cost(node) for node in nodes])
    rows: list[tuple[dict[int, float], float]] = []
    for node in nodes:
        i = index[node]
        if node in info.needed:
            rows.append(({i: 1.0, n + i: 1.0}, 1.0))               # saved or recomputed
        for arg in info.inputs_of(node):
            if arg in index:                                        # inputs of a recompute
                j = index[arg]
                rows.append(({j: 1.0, n + j: 1.0, n + i: -1.0}, 0.0))
    matrix = lil_matrix((len(rows) + 1, 2 * n))
    for row, (coefficients, _) in enumerate(rows):
        for column, value in coefficients.items():
            matrix[row, column] += value
    for i in range(n):
        matrix[len(rows), i] = sizes[i]
    lower = np.array([bound for _, bound in rows] + [-np.inf])
    upper = np.array([np.inf] * len(rows) + [budget])
    scale = max(1.0, sizes.sum())
    tie_break = (costs[costs > 0].min() if (costs > 0).any() else 1.0) * 1e-3
    objective = np.concatenate([sizes / scale * tie_break, costs])
    high = np.concatenate([savable.astype(float),
                           [1.0 if recomputable(node) else 0.0 for node in nodes]])
    result = milp(objective, constraints=LinearConstraint(matrix.tocsr(), lower, upper),
                  integrality=np.ones(2 * n), bounds=Bounds(np.zeros(2 * n), high),
                  options={"time_limit": time_limit})
    if result.x is None:
        return None
    chosen = np.round(result.x).astype(bool)
    saved = {node for node in nodes if chosen[index[node]]}
    recomputed = {node for node in nodes if chosen[n + index[node]] and node not in saved}
    return Plan(saved, needed_closure(info, saved, recomputed), "ilp (scipy HiGHS milp)",
                result.status == 0)
