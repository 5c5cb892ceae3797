"""The saved-tensor ledger and the bytes/recompute trade-off, for the report.

``rows`` describes every value that crosses from forward to backward (or was
recomputed instead): node name, op, shape, dtype, bytes, the fx stack trace
(the compiler turns it into the user's ``file:line``), decision, reason and
FLOPs. ``pareto`` lists the plans of ``remat_search.tradeoff`` (none beaten
on both saved bytes and recompute cost) with their recompute FLOPs and a
predicted peak (``predicted_peak``), so a user can see what each
``memory_budget`` would buy.

``predicted_peak`` is a graph-level estimate, before fusion and the arena:
the most bytes of activations and gradients alive at once when the joint
graph runs in its order under a plan. A forward value lives from its node
to its last forward reader; a saved one to its last backward reader (the
backward program frees it there: counted to the end of the backward, saving
less looked cheaper than it is, and on the zoo's LLaMA the plan at 0.5 was
predicted below 0.75's while its measured step peak rose by 1,172 bytes); a
recomputed one again from where it is recomputed to its last backward
reader. Recomputation runs just before the first backward reader that needs
it, a chain in its forward order, each value freed after its last reader
(as ``sink_recomputation`` places it): a chain of ten recomputed values
for one reader is not ten values alive at once. A backward value lives
from its node to its last reader; one that has an in-place form and reads
last a backward value of its own size takes that value's buffer (the
program's in-place rewrite: the embedding backward's ``index_put`` into its
zeros). A multi-output op (attention's backward) holds its outputs beside
its inputs while it runs. Inputs, parameters, their views and tangents are
left out, as in the saved bytes.
"""

from __future__ import annotations

import math

import torch
from retrograd.passes.planning import remat, remat_search
from torch import fx

__all__ = ["pareto", "predicted_peak", "rows"]


def _tensor_bytes(node: fx.Node) -> int:
    val = node.meta.get("val")
    return val.numel() * val.element_size() if isinstance(val, torch.Tensor) else 0


def _row(node: fx.Node, decision: str, reason: str, size: int) -> dict:
    val = node.meta.get("val")
    tensor = isinstance(val, torch.Tensor)
    op = node.target if isinstance(node.target, torch._ops.OpOverload) else \
        getattr(node.target, "__name__", node.target)
    return {"name": node.name, "op": str(op),
            "shape": [int(d) if isinstance(d, int) else str(d) for d in val.shape]
            if tensor else None,
            "dtype": str(val.dtype).removeprefix("torch.") if tensor else None,
            "bytes": size, "stack_trace": node.meta.get("stack_trace"),
            "decision": decision, "reason": reason,
            "recompute_flops": int(remat.extra_flops(node))}


def rows(saved, recomputed, joint_node, reason) -> list[dict]:
    """One row per saved activation (``saved``: the nodes whose bytes make
    ``saved_activation_bytes``), then one per recomputed node. ``joint_node``
    maps a node to the joint graph's (for op and stack trace); ``reason(node,
    decision)`` says why. ``recompute_flops``: what recomputing the node from
    its inputs costs (spent for recomputed rows, avoided for saved ones)."""
    table = [_row(joint_node(n), "saved", reason(joint_node(n), "saved"), _tensor_bytes(n))
             for n in saved]
    table += [_row(n, "recomputed", reason(n, "recomputed"), _tensor_bytes(n))
              for n in recomputed]
    return table


#: the sub-slot of a node that is not recomputed: after every recomputation
#: placed just before it
_AFTER = 1 << 30


def _recompute_slots(info, forward: set, recomputed: set, order: dict) -> dict:
    """Where each recomputed value is evaluated: (position of its first
    backward reader, its forward index), so a chain recomputed for one reader
    runs in its forward order just before it, as ``sink_recomputation`` puts
    it; latest values first, since a value's slot depends on its readers'."""
    index = {node: i for i, node in enumerate(info.forward)}
    slots = {}
    for node in reversed(info.forward):
        if node not in recomputed:
            continue
        firsts = [order[u] for u in node.users if u not in forward and u.op != "output"]
        firsts += [slots[u][0] for u in node.users if u in slots]
        if firsts:
            slots[node] = (min(firsts), index[node])
    return slots


def _is_tuple(node: fx.Node) -> bool:
    """A multi-output op (its ``getitem`` nodes hold the tensors)."""
    return isinstance(node.meta.get("val"), (tuple, list))


def _outputs_bytes(node: fx.Node) -> int:
    """Bytes of a multi-output op's tensors (``getitem`` nodes read them)."""
    return sum(v.numel() * v.element_size() for v in node.meta["val"]
               if isinstance(v, torch.Tensor))


def _takes_over(node: fx.Node, excluded: set, order: dict) -> bool:
    """Whether a backward op writes its result into its first argument's buffer:
    the argument (a backward or recomputed value, not a saved one) has the
    same size and is read last here, and the op has an in-place form
    (``index_put`` -> ``index_put_``); the program's in-place rewrite does
    that, so the two are never alive at once."""
    arg = node.args[0] if node.args else None
    if not isinstance(arg, fx.Node) or arg.op != "call_function" or arg in excluded \
            or _is_tuple(arg):
        return False
    if _tensor_bytes(arg) != _tensor_bytes(node) or not isinstance(
            node.target, torch._ops.OpOverload):
        return False
    in_place = hasattr(torch.ops.aten, node.target._opname + "_")
    return in_place and max(order[u] for u in arg.users) == order[node]


def _lives(graph: fx.Graph, info, saved, recomputed):
    """(bytes, first slot, last slot) of every value the peak counts (module
    docstring); a slot is (graph position, sub-slot)."""
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    forward, skip = set(info.forward), set(info.free) | set(info.primals)
    slots = _recompute_slots(info, forward, set(recomputed), order)
    boundary = min((order[n] for n in nodes if n.op == "call_function" and n not in forward),
                   default=len(nodes)), 0

    def read_at(user):   # where a reader reads: its own slot if recomputed
        return slots.get(user, (order[user], _AFTER))
    for node in nodes:
        if node.op != "call_function" or node in skip:
            continue
        size, here = _tensor_bytes(node), (order[node], _AFTER)
        if _is_tuple(node):   # its outputs, alive beside its inputs while it runs;
            yield from ((_outputs_bytes(node), at, at)     # its getitems count them after
                        for at in (here, slots.get(node)) if at is not None)
            continue
        if node not in forward:
            first = (here[0], _AFTER + 1) if _takes_over(node, saved | skip, order) else here
            yield size, first, max((read_at(u) for u in node.users), default=first)
            continue
        if node in saved:   # freed by the backward after its last reader, as the program does
            readers = [read_at(u) for u in node.users if u.op != "output"]
            yield size, here, max(readers + [boundary], default=here)
            continue
        forward_readers = [read_at(u) for u in node.users if u in forward or u.op == "output"]
        forward_readers = [slot for slot in forward_readers if slot[1] == _AFTER]
        yield size, here, max(forward_readers, default=here)
        if node in slots:
            readers = [read_at(u) for u in node.users if u in slots or u not in forward]
            yield size, slots[node], max(readers, default=slots[node])


def predicted_peak(graph: fx.Graph, info: remat.JointInfo, saved, recomputed) -> int:
    """Most bytes of activations and gradients alive at once (module docstring)."""
    lives = list(_lives(graph, info, set(saved), recomputed))
    events = sorted({slot for _, first, last in lives for slot in (first, last)})
    position = {slot: i for i, slot in enumerate(events)}
    change = [0] * (len(events) + 1)
    for size, first, last in lives:
        change[position[first]] += size
        change[position[last] + 1] -= size
    peak = current = 0
    for delta in change:
        current += delta
        peak = max(peak, current)
    return peak


def pareto(graph: fx.Graph, info: remat.JointInfo, recomputable, unsavable,
           save_all_bytes: float, max_work: int = 200_000) -> list[dict]:
    """The trade-off's plans by saved bytes: the ``memory_budget`` that picks
    each (its bytes over ``save_all_bytes``), saved bytes, recompute FLOPs and
    cost, predicted peak. ``max_work`` bounds the local search (dumps only)."""
    plans, frontier = remat_search.tradeoff(info, recomputable, unsavable, max_work=max_work)
    table = []
    for saved_bytes, cost, chosen in frontier.points:
        plans.load(chosen)
        live = [i for i, users in enumerate(plans.users) if users]
        recomputed = {plans.nodes[i] for i in live if plans.in_r[i]}
        saved = {plans.nodes[i] for i in live if not plans.in_r[i]}
        table.append({
            "memory_budget": math.ceil(saved_bytes / save_all_bytes * 1e4) / 1e4
            if save_all_bytes else None,
            "saved_bytes": int(saved_bytes),
            "recompute_flops": int(sum(remat.extra_flops(n) for n in recomputed)),
            "recompute_cost": float(cost),
            "predicted_peak_bytes": predicted_peak(graph, info, saved, recomputed)})
    return table
