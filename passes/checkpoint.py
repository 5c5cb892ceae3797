"""Checkpoint placement: which forward values the backward gets, and the split.

What it does: chooses which forward values are saved for the backward and
which the backward recomputes (planners in ``planning/remat.py``), splits the joint
graph into forward and backward accordingly, and moves each recomputed node
next to its first backward consumer, so fusion folds it into that kernel and
it does not stay alive longer than needed.

- ``memory_budget=None``: the fewest saved bytes, recomputing only cheap ops
  (pointwise, views, fills, reductions, indexed reads, and uniform draws,
  which are a pure function of a saved seed: compiler/rng.py), never matrix
  products, convolutions or seed draws. A minimum cut, as in AOTAutograd's
  min-cut partitioner.
- ``memory_budget=f``: saved bytes at most ``f`` times those of the plan that
  saves every forward value the backward reads (``save_all_bytes``), at the
  least recompute cost; any deterministic op may be recomputed, matrix
  products included, if the budget demands. Exact (ILP) on graphs with at most
  ``EXACT_LIMIT`` forward nodes, greedy above; the stats say which ran and
  whether the plan is proven optimal. A budget below what recomputing
  everything allows (the floor) gives that smallest plan and a warning
  naming the floor in bytes and as a fraction (stats ``budget_floor``).
  The predicted peak never rises as the budget tightens: a plan that would
  peak above a looser budget's plan (or, below the default plan's bytes,
  above the default plan) is rejected; the rule, what it guarantees and the
  issue it answers (pytorch issue 197838) are in ``planning/budget.py``.
- ``save`` / ``recompute`` options force ops or named values either way.
- An input the program writes in place (``x.add_(1)`` in the forward) is
  read by the backward only through a copy taken in the forward, which is
  never recomputed: the caller's tensor has changed by the time the backward
  runs (``protect_mutated_inputs``).

Bytes are counted once per value, leaving out inputs, parameters and views of
them (``permute(weight)``), which the caller keeps alive anyway: the same
convention as measuring eager with ``torch.autograd.graph.saved_tensors_hooks``.

Assumes the AOTAutograd joint graph (``forward(primals, tangents)``).
Returns two GraphModules, forward and backward.

Requires: AOTAutograd's joint graph and ctx.num_fwd_outputs (run); a step
  graph and ctx.seed (rematerialize).
Ensures: (forward, backward) whose composition gives the joint's values,
  saving only what the plan chose (run); one graph, same values, recomputed
  values read only in the backward (rematerialize).
"""

from __future__ import annotations

import functools
import inspect
import operator

import torch
import torch.fx as fx
from retrograd.ir import PassResult
from retrograd.passes.op_classes import PHASE, RECOMPUTED, is_pure, is_view, view_base
from retrograd.passes.planning import budget as budget_plans
from retrograd.passes.planning import ledger, patterns, remat
from retrograd.passes.planning.collectives import mark_regathered, reads_regathered, regathered
from torch._functorch import partitioners

__all__ = ["run", "saved_values", "extract", "recompute_in_backward", "Policy", "EXACT_LIMIT"]

#: Largest number of forward nodes handed to the exact (ILP) budget solver.
EXACT_LIMIT = 600


def _aliases_input(node: fx.Node | None) -> bool:
    """True for a forward placeholder or a view of one (``permute(primals_1)``,
    an item of ``split(primals_1)``): it shares the caller's storage, so saving
    it costs no memory. Never for a multi-output node itself: only tensors can
    cross to the backward, so the planners must save its items instead."""
    if node is not None and node.op != "placeholder" and \
            not isinstance(node.meta.get("val"), torch.Tensor):
        return False
    return node is not None and view_base(node, through_items=True).op == "placeholder"


def saved_values(forward: fx.GraphModule, backward: fx.GraphModule):
    """The backward's placeholders that the forward hands over (not tangents),
    and those of them that are activations (neither inputs nor their views)."""
    forward_nodes = {node.name: node for node in forward.graph.nodes}
    saved = [node for node in backward.graph.nodes
             if node.op == "placeholder" and not node.name.startswith("tangents")]
    activations = [node for node in saved if not _aliases_input(forward_nodes.get(node.name))]
    return saved, activations


def _bytes(nodes) -> int:
    total = 0
    for node in nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            total += val.numel() * val.element_size()
    return total


def mutated_inputs(joint: fx.GraphModule) -> list[fx.Node]:
    """The forward placeholders whose data the program writes, from the
    descriptors AOTAutograd puts on the joint graph's output
    (``InputMutationAOTOutput``: the new value the runtime copies back after
    the forward)."""
    output = next(n for n in reversed(joint.graph.nodes) if n.op == "output")
    written = [getattr(d, "mutated_input", None) for d in output.meta.get("desc") or ()]
    written = [d for d in written if d is not None]
    return [n for n in joint.graph.nodes if n.op == "placeholder"
            and n.meta.get("desc") is not None and n.meta["desc"] in written]


def protect_mutated_inputs(joint: fx.GraphModule) -> set[str]:
    """Route every use of an input the program mutates through ``clone`` of it.

    AOTAutograd writes the mutation back into the caller's tensor after the
    forward, so a backward that reads the input (saved, or to recompute a
    product from it) would see the new values: autograd's version check
    refuses it, or (``aot_eager``, torch 2.13) the gradient is silently
    wrong. The clone is a forward value like any other: the plan saves it
    (or values computed from it) but never recomputes it. Returns the clones'
    names, which the policy pins as saved.
    """
    pinned = set()
    for placeholder in mutated_inputs(joint):
        users = list(placeholder.users)
        if not users:
            continue
        with joint.graph.inserting_before(users[0] if users[0].op != "placeholder"
                                          else placeholder.next):
            copy = joint.graph.call_function(torch.ops.aten.clone.default, (placeholder,))
        copy.meta.update(val=placeholder.meta.get("val"), partitioner_tag="is_forward")
        if "tensor_meta" in placeholder.meta:
            copy.meta["tensor_meta"] = placeholder.meta["tensor_meta"]
        for user in users:
            user.replace_input_with(placeholder, copy)
        pinned.add(copy.name)
    if pinned:
        joint.graph.lint()
        joint.recompile()
    return pinned


class Policy:
    """What may be recomputed, from the op and the user's ``save``/``recompute``;
    ``pinned`` names values that are always saved, never recomputed."""

    def __init__(self, options, op_support, pinned: set[str] = frozenset()):
        # an offloaded value (passes/offload.py) is saved, on the host
        self.save = set(options.save) | set(options.offload)
        self.recompute = set(options.recompute)
        self.pinned = set(pinned)
        self.support = op_support
        self.budget_fraction = options.memory_budget

    _names = staticmethod(patterns.node_names)

    def forced_save(self, node: fx.Node) -> bool:
        return node.name in self.pinned or bool(self._names(node) & self.save)

    def forced_recompute(self, node: fx.Node) -> bool:
        """The user's ``recompute=``, and an FSDP2 unit's gathered parameters
        where it reshards after the forward (gathered again, never saved)."""
        return node.name not in self.pinned and (
            regathered(node) or bool(self._names(node) & self.recompute))

    def pattern(self, node: fx.Node, forced: set[str]) -> str | None:
        """The user's ``save=``/``recompute=`` entry that names ``node``, if any."""
        return next(iter(sorted(self._names(node) & forced)), None)

    def reason(self, node: fx.Node, decision: str, budget: float | None) -> str:
        """Why the plan saved or recomputed ``node``, for the ledger."""
        if node.name in self.pinned:
            return "pinned: copy of an input the program writes in place"
        if regathered(node):
            return "reshard_after_forward: FSDP2 parameters all-gathered again"
        forced = self.pattern(node, self.save if decision == "saved" else self.recompute)
        if forced is not None:
            return f"{'save' if decision == 'saved' else 'recompute'}={forced}"
        if budget is not None:
            why = "" if decision == "recomputed" or self.any(node) else ", not recomputable"
            return f"budget: memory_budget={self.budget_fraction} ({budget:.0f} bytes){why}"
        if decision == "recomputed":
            return "min-cut: cheap to recompute from smaller saved values"
        if not is_pure(node):
            return "min-cut: not recomputable (a random draw or impure op)"
        if not self.cheap(node):
            return "min-cut: not recomputable by default (matrix product, convolution, extern op)"
        return "min-cut: fewer bytes than the values recomputing it would need"

    def cheap(self, node: fx.Node) -> bool:
        """Recomputable under the default plan."""
        if regathered(node):
            return True
        if reads_regathered(node):
            return False
        if self.forced_recompute(node):
            return is_pure(node)
        if self.forced_save(node) or not is_pure(node):
            return False
        if node.target is operator.getitem or is_view(node):
            return True
        support = self.support
        return (torch.Tag.pointwise in getattr(node.target, "tags", ())
                or support.can_lower(node) or support.can_reduce(node))

    def any(self, node: fx.Node) -> bool:
        """Recomputable when a budget demands it: every deterministic op."""
        return regathered(node) or not (self.forced_save(node) or reads_regathered(node)) \
            and is_pure(node)


def extract(joint: fx.GraphModule, saved: list[fx.Node], num_fwd_outputs: int,
            saved_symbols: list[fx.Node] = ()):
    """AOTAutograd's own extraction of the two halves around ``saved`` (and
    the size symbols the backward reads, on a symbolic joint graph)."""
    keywords = {"saved_sym_nodes": list(saved_symbols), "num_fwd_outputs": num_fwd_outputs}
    parameters = inspect.signature(partitioners._extract_fwd_bwd_modules).parameters
    keywords = {k: v for k, v in keywords.items() if k in parameters}
    forward, backward = partitioners._extract_fwd_bwd_modules(joint, saved, **keywords)
    forward.graph.eliminate_dead_code()
    # The extraction copies every node whose inputs the backward has, so a
    # random draw from a saved input (``rand_like(primals_1)`` of dropout)
    # lands there unused; fx's DCE keeps random ops unless told they are pure.
    backward.graph.eliminate_dead_code(
        is_impure_node=lambda node: node.is_impure(impure_random=False))
    return forward, backward


def sink_recomputation(backward: fx.GraphModule, recomputed: set[str]) -> None:
    """Move each recomputed node just before its first consumer (latest first,
    so chains follow their consumers), keeping recomputed values short-lived."""
    for node in reversed(list(backward.graph.nodes)):
        if node.name not in recomputed or not node.users:
            continue
        order = {n: i for i, n in enumerate(backward.graph.nodes)}
        first_user = min(node.users, key=order.__getitem__)
        if order[first_user] > order[node] + 1:
            first_user.prepend(node)
    backward.graph.lint()
    backward.recompile()


def _plan(info, ctx, policy: Policy, save_all_bytes: float, graph: fx.Graph):
    """(plan, budget bytes or None, guard stats): the min-cut without a
    budget, else ``budget.plan_for_budget`` (solver, floor, peak guard)."""
    fraction = ctx.options.memory_budget
    if fraction is None:
        plan = remat.min_cut_plan(info, policy.cheap, policy.forced_recompute)
        return plan, None, {"predicted_peak_bytes": ledger.predicted_peak(
            graph, info, plan.saved, plan.recomputed, _scratch(ctx))}
    exact = len(info.forward) <= EXACT_LIMIT
    plan, stats = budget_plans.plan_for_budget(graph, info, fraction, save_all_bytes, policy,
                                               exact, ctx.log, _scratch(ctx))
    return plan, fraction * save_all_bytes, stats


def _scratch(ctx):
    """The compiler's probe of an extern op's scratch (``node -> bytes or
    None``), for the predicted peak (``planning/ledger.py``), if it gives one;
    remembered per node, since the budget walk predicts many plans' peaks."""
    probe = getattr(ctx.op_support, "extern_scratch", None)
    return None if probe is None else functools.cache(probe)


def _honor_save(info, policy):
    """``save=`` (and pinned values) outrank the analysis: a value the user
    names is never one the backward may evaluate again for free (``once``)."""
    info.once = {node for node in info.once if not policy.forced_save(node)}
    return info


def run(joint: fx.GraphModule, ctx) -> PassResult:
    """Plan, split ``joint`` into (forward, backward), sink recomputation.
    ``ctx.num_fwd_outputs``: how many of the joint's outputs are the forward's."""
    count = ctx.num_fwd_outputs
    patterns.check(joint.graph, ctx.options.save, ctx.options.recompute, ctx.graph_name)
    policy = Policy(ctx.options, ctx.op_support, protect_mutated_inputs(joint))
    info = _honor_save(remat.analyse(joint, count, free=_aliases_input), policy)
    save_all_bytes = remat.plan_bytes(info, remat.save_all_plan(info).saved)
    plan, budget, guard = _plan(info, ctx, policy, save_all_bytes, joint.graph)
    saved = [n for n in joint.graph.nodes if n in plan.saved or n.op == "placeholder"
             and not n.name.startswith("tangents")]
    forward, backward = extract(joint, saved, count)
    by_name = {n.name: n for n in info.forward}
    recomputed = [n for n in backward.graph.nodes
                  if n.op == "call_function" and n.name in by_name]
    sink_recomputation(backward, {n.name for n in recomputed})
    kept, activations = saved_values(forward, backward)
    recomputed = [by_name[n.name] for n in recomputed]
    forward_nodes = {n.name: n for n in forward.graph.nodes}
    activation_bytes = remat.storage_bytes(forward_nodes[n.name] for n in activations)
    stats = _stats(ctx, info, plan, budget, save_all_bytes, activations, recomputed)
    stats.update(guard)
    stats.update(saved_activation_bytes=activation_bytes, saved_values=len(kept),
                 saved_input_bytes=_bytes(kept) - _bytes(activations))
    stats.update(_ledger(joint, ctx, info, policy, budget, save_all_bytes, activations,
                         recomputed, lambda n: by_name.get(n.name, n)))
    return PassResult((forward, backward), stats)


def _ledger(graph_module, ctx, info, policy: Policy, budget, save_all_bytes, saved,
            recomputed, joint_node) -> dict:
    """The ledger rows (``ledger.rows``) and, when dumping, the trade-off."""
    rows = ledger.rows(saved, recomputed, joint_node,
                       lambda node, decision: policy.reason(node, decision, budget))
    return {"ledger": rows, "pareto": _pareto(graph_module, ctx, info, policy, save_all_bytes,
                                              {joint_node(n) for n in saved}, recomputed)}


def _pareto(graph_module, ctx, info, policy: Policy, save_all_bytes, saved, recomputed):
    """``ledger.pareto``'s plans and today's plan's point (``saved``,
    ``recomputed``: nodes of ``graph_module``), only when dumping: the
    trade-off costs a search the compile itself does not need."""
    if not getattr(ctx.dumper, "enabled", False):
        return None
    return {"points": ledger.pareto(graph_module.graph, info, policy.any,
                                    policy.forced_recompute, save_all_bytes,
                                    scratch=_scratch(ctx)),
            "current": {"memory_budget": ctx.options.memory_budget,
                        "saved_bytes": int(remat.plan_bytes(info, saved)),
                        "recompute_flops": int(sum(remat.extra_flops(n) for n in recomputed)),
                        "recompute_cost": float(sum(remat.recompute_cost(n) for n in recomputed)),
                        "predicted_peak_bytes": ledger.predicted_peak(
                            graph_module.graph, info, set(saved), set(recomputed),
                            _scratch(ctx))}}


def _stats(ctx, info, plan, budget, save_all_bytes: float, activations, recomputed) -> dict:
    """What a checkpoint plan chose: saved activations and recomputed nodes."""
    return {
        "plan": "least saved bytes, cheap recompute" if budget is None else
                f"memory_budget={ctx.options.memory_budget}",
        "solver": plan.solver,
        "optimal": plan.optimal,
        "save_all_bytes": int(save_all_bytes),
        "budget_bytes": None if budget is None else int(budget),
        "saved_activation_values": len(activations),
        "saved_activation_bytes": remat.storage_bytes(activations),
        "saved": [n.name for n in activations],
        "recomputed": [n.name for n in recomputed],
        "recomputed_nodes": len(recomputed),
        "recomputed_flops": int(sum(remat.extra_flops(n) for n in recomputed)),
        "recompute_cost": float(sum(remat.recompute_cost(n) for n in recomputed)),
    }


def rematerialize(step: fx.GraphModule, ctx) -> PassResult:
    """Checkpoint placement inside one graph: compile_step's whole training step.

    Forward, backward and update share one program, so there is nothing to
    split; what crosses from forward to backward is still chosen the same way
    (the placeholder ``seed``, the loss's cotangent, plays the tangent, and
    ``memory_budget``/``save``/``recompute`` apply). Every backward reader of
    a value the plan recomputes then reads a copy evaluated just before its
    first backward reader, so the forward's own value dies at its last
    forward use and only the saved values stay alive across the step (the
    same effect as the split, as in Checkmate's single-graph formulation).
    Finally the seed is folded as the constant 1. ``ctx.seed`` names it.
    """
    seed = ctx.seed
    graph = step.graph
    is_seed = lambda node: node.op == "placeholder" and node.name == seed  # noqa: E731
    patterns.check(graph, ctx.options.save, ctx.options.recompute, ctx.graph_name)
    mark_regathered(graph)   # FSDP2's reshard_after_forward (planning/collectives.py)
    policy = Policy(ctx.options, ctx.op_support)
    info = _honor_save(remat.analyse(step, 1, free=_aliases_input, is_tangent=is_seed), policy)
    save_all_bytes = remat.plan_bytes(info, remat.save_all_plan(info).saved)
    plan, budget, guard = _plan(info, ctx, policy, save_all_bytes, graph)
    pareto = _pareto(step, ctx, info, policy, save_all_bytes, plan.saved, plan.recomputed)
    backward = remat.backward_nodes(graph, is_seed)
    copies = recompute_in_backward(graph, backward, lambda node: node in plan.recomputed)
    _fold_seed(graph, seed)
    graph.eliminate_dead_code()   # forward values read only through copies now
    graph.lint()
    step.recompile()
    saved = sorted((n for n in plan.saved if n not in info.primals and n not in info.free),
                   key=lambda n: n.name)
    recomputed = sorted(copies, key=lambda n: n.name)
    stats = _stats(ctx, info, plan, budget, save_all_bytes, saved, recomputed)
    stats.update(guard)
    reason = lambda node, decision: policy.reason(node, decision, budget)  # noqa: E731
    stats.update(ledger=ledger.rows(saved, recomputed, lambda n: n, reason), pareto=pareto)
    return PassResult(step, stats)


def _fold_seed(graph: fx.Graph, seed: str) -> None:
    """Replace the loss cotangent placeholder's uses by the constant 1."""
    node = next(n for n in graph.nodes if n.op == "placeholder" and n.name == seed)
    if not node.users:
        return
    value = node.meta["val"]
    first = min(node.users, key=list(graph.nodes).index)
    with graph.inserting_before(first):
        one = graph.call_function(torch.ops.aten.full.default, ([], 1.0),
                                  {"dtype": value.dtype, "device": value.device,
                                   "pin_memory": False})
    one.meta = dict(node.meta)
    one.meta[PHASE] = "backward"
    node.replace_all_uses_with(one)


def recompute_in_backward(graph: fx.Graph, backward: set[fx.Node], recomputed) -> dict:
    """Make every backward reader of a node for which ``recomputed(node)``
    holds read a copy of it (and of the recomputed nodes it reads) inserted
    just before that reader's first backward reader; mark each call's
    ``PHASE``. Returns {node: its copy}. Used on the one step graph here and
    on the symbolic step graph (compiler/symbolic_remat.py)."""
    copies: dict[fx.Node, fx.Node] = {}

    def copy_of(node: fx.Node, reader: fx.Node) -> fx.Node:
        if not recomputed(node):
            return node
        if node not in copies:
            args = fx.map_arg(node.args, lambda arg: copy_of(arg, reader))
            kwargs = fx.map_arg(node.kwargs, lambda arg: copy_of(arg, reader))
            with graph.inserting_before(reader):
                copy = graph.create_node("call_function", node.target, args, kwargs,
                                         name=f"{node.name}_recomputed")
            copy.meta = dict(node.meta)
            copy.meta[RECOMPUTED] = node.name
            copies[node] = copy
        return copies[node]

    for node in list(graph.nodes):
        if node in backward and node.op == "call_function":
            node.args = fx.map_arg(node.args, lambda arg, reader=node: copy_of(arg, reader))
            node.kwargs = fx.map_arg(node.kwargs, lambda arg, reader=node: copy_of(arg, reader))
    for node in graph.nodes:
        if node.op == "call_function":
            node.meta[PHASE] = "backward" if node in backward or node in copies.values() \
                else "forward"
    return copies
