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
from its node to its last reader. A backward or recomputed op takes the
storage of an operand that dies there, as the torch program's in-place
rewrite does (``codegen/torch_liveness.py``): a pointwise op any operand's
of its shape, dtype and strides (GELU's backward chain, ``torch.mul(a, b,
out=b)``), another op with an in-place form its first argument's of its
size (the embedding backward's ``index_put`` into its zeros); a saved value
is the caller's, never taken. A multi-output op (attention's backward) holds its outputs beside
its inputs while it runs. A view (an op whose schema says its result
aliases its input: ``t``, ``permute``, ``expand``, ``slice``, an item of
``split``) counts no bytes: its base's storage stays alive until the view's
last reader, transitively, for forward, saved, recomputed and backward
values alike (GPT-2's recomputed ``view_11`` and ``permute_26``, 8,192
bytes each, were counted as values of their own). Inputs, parameters,
their views, tangents and theirs are left out, as in the saved bytes.

An extern op's scratch (what the call allocates beyond its result while it
runs: oneDNN's weight copies and scratchpad for a CPU convolution, 15-25 kB
on the zoo's CNN, against 8,800 bytes of values) counts at the op's slot
and at its recomputation's, when the caller gives ``scratch(node) -> bytes
or None``. No pass measures it: the compiler probes the op once per
signature (``compiler/extern_scratch.py``, ``node_scratch``) and hands the
probe in through the pass context (``ctx.op_support.extern_scratch``).
Without it the prediction could not see what sets the CNN's peak.
"""

from __future__ import annotations

import math
import operator

import torch
from retrograd.passes.op_classes import is_view
from retrograd.passes.planning import remat, remat_search
from torch import fx

__all__ = ["pareto", "predicted_peak", "profile", "rows"]


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


def _alias_parent(node: fx.Node) -> fx.Node | None:
    """The value whose storage ``node``'s result shares, or None: the first
    argument of a view (``is_view``: the op schema's alias annotation on its
    result, e.g. ``t``, ``permute``, ``expand``, ``slice``, ``split``, and
    ``_unsafe_view``, whose schema carries none though it shares its input's
    storage) and of an item of a multi-output view (``split(x)[0]``)."""
    arg = node.args[0] if node.args else None
    if node.op != "call_function" or not isinstance(arg, fx.Node):
        return None
    return arg if is_view(node) or node.target is operator.getitem and is_view(arg) else None


def _own_lives(node: fx.Node, ctx: dict):
    """(instance, first slot, reader slots) of ``node``'s values: ``bwd`` for a
    backward value; ``fwd`` for the forward's (to its last backward reader if
    saved, else its last forward one); ``rec`` for its recomputation."""
    forward, here, read_at = ctx["forward"], (ctx["order"][node], _AFTER), ctx["read_at"]
    if node not in forward:
        yield "bwd", here, [read_at(u) for u in node.users]
        return
    if node in ctx["saved"]:   # freed by the backward after its last reader, as the program does
        yield "fwd", here, [read_at(u) for u in node.users if u.op != "output"] + [ctx["boundary"]]
        return
    readers = [read_at(u) for u in node.users if u in forward or u.op == "output"]
    yield "fwd", here, [slot for slot in readers if slot[1] == _AFTER]
    if node in ctx["slots"]:
        yield "rec", ctx["slots"][node], [read_at(u) for u in node.users
                                          if u in ctx["slots"] or u not in forward]


def _owner(node: fx.Node, instance: str, owners: dict):
    """The (root value, instance) whose storage a view's value of ``instance``
    is: its parent's value of the same instance, else (a recomputed view of a
    saved base, a backward view of a forward value) the nearest one that
    exists; None for views of inputs, parameters and tangents."""
    parent = _alias_parent(node)
    order = {"fwd": ("fwd",), "rec": ("rec", "fwd"), "bwd": ("bwd", "rec", "fwd")}[instance]
    return next((owners[(parent, i)] for i in order if (parent, i) in owners), None)


def _storages(graph: fx.Graph, ctx: dict):
    """Per storage (root value, instance): [bytes, first slot, reader slots],
    a view's readers added to its base's (transitively); and the multi-output
    ops' (bytes, slot) while they run."""
    owners, storages, running = {}, {}, []
    for node in graph.nodes:
        if node.op != "call_function" or node in ctx["skip"]:
            continue
        view = _alias_parent(node) is not None
        if _is_tuple(node) and not view:   # its outputs, alive beside its inputs while it runs;
            running += [(_outputs_bytes(node), at)           # its getitems count them after
                        for at in ((ctx["order"][node], _AFTER), ctx["slots"].get(node))
                        if at is not None]
            continue
        for instance, first, readers in _own_lives(node, ctx):
            key = _owner(node, instance, owners) if view else (node, instance)
            if key is None:
                continue
            owners[(node, instance)] = key
            if not view:
                storages[key] = [_tensor_bytes(node), first, []]
            storages[key][2].extend(readers)
    return storages, running, owners


def _same_layout(arg: fx.Node, node: fx.Node) -> bool:
    a, b = arg.meta.get("val"), node.meta.get("val")
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and (
        a.shape, a.dtype, a.stride()) == (b.shape, b.dtype, b.stride())


def _donor(node: fx.Node, instance: str, ctx: dict, taken: set):
    """The storage a backward or recomputed op writes its result into, or None,
    as the torch program's in-place rewrite (``codegen/torch_liveness.py``)
    does: a pointwise op into any operand of its shape, dtype and strides
    (``torch.mul(a, b, out=b)``, through a view too), another op with an
    in-place form into its first argument of its size (``index_put_``); the
    operand's storage made by the backward (a backward or recomputed value,
    not a saved one: the caller's) and read last here."""
    if not isinstance(node.target, torch._ops.OpOverload):
        return None
    pointwise = torch.Tag.pointwise in node.target.tags
    in_place = hasattr(torch.ops.aten, node.target._opname + "_")
    args = [a for a in (node.args if pointwise else node.args[:1]) if isinstance(a, fx.Node)]
    at = ctx["read_at"](node)
    for arg in args:
        key = next((ctx["owners"][(arg, i)] for i in ("bwd", "rec")
                    if (arg, i) in ctx["owners"]), None)
        if key is None or key in taken or _tensor_bytes(key[0]) != _tensor_bytes(node):
            continue
        fits = _same_layout(arg, node) if pointwise else in_place and arg is key[0]
        _, first, readers = ctx["storages"][key]
        if fits and max(readers, default=first) == at:
            return key
    return None


def _scratch_lives(graph: fx.Graph, ctx: dict, scratch):
    """(bytes, slot, slot) of each op's scratch where it runs: its own slot
    (a forward op in the forward, a backward op in the backward) and, if it
    is recomputed, its recomputation's."""
    for node in graph.nodes:
        if node.op != "call_function" or node in ctx["skip"]:
            continue
        size = scratch(node) or 0
        if size <= 0:
            continue
        for at in ((ctx["order"][node], _AFTER), ctx["slots"].get(node)):
            if at is not None:
                yield size, at, at


def _lives(graph: fx.Graph, info, saved, recomputed, scratch=None):
    """(bytes, first slot, last slot) of every storage the peak counts (module
    docstring), extern scratch too where ``scratch`` is given; a slot is
    (graph position, sub-slot)."""
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    forward = set(info.forward)
    slots = _recompute_slots(info, forward, set(recomputed), order)
    ctx = {"order": order, "forward": forward, "saved": saved, "slots": slots,
           "skip": set(info.free) | set(info.primals),
           "read_at": lambda user: slots.get(user, (order[user], _AFTER)),
           "boundary": (min((order[n] for n in nodes if n.op == "call_function"
                             and n not in forward), default=len(nodes)), 0)}
    storages, running, ctx["owners"] = _storages(graph, ctx)
    ctx["storages"] = storages
    yield from ((size, at, at) for size, at in running)
    if scratch is not None:
        yield from _scratch_lives(graph, ctx, scratch)
    taken = set()
    for (node, instance), (size, first, readers) in storages.items():
        donor = _donor(node, instance, ctx, taken) if instance != "fwd" else None
        if donor is not None:   # begins just after its operand's storage ends
            taken.add(donor)
            first = (first[0], first[1] + 0.5)
        yield size, first, max(readers, default=first)


def profile(graph: fx.Graph, info: remat.JointInfo, saved, recomputed,
            scratch=None) -> dict[int, int]:
    """Most bytes alive at once while each graph position runs (its
    recomputations included): the curve whose maximum is ``predicted_peak``.
    ``scratch(node) -> int | None``: an extern op's scratch (module docstring)."""
    lives = list(_lives(graph, info, set(saved), recomputed, scratch))
    events = sorted({slot for _, first, last in lives for slot in (first, last)})
    position = {slot: i for i, slot in enumerate(events)}
    change = [0] * (len(events) + 1)
    for size, first, last in lives:
        change[position[first]] += size
        change[position[last] + 1] -= size
    curve, current = {}, 0
    for slot, delta in zip(events, change):
        current += delta
        curve[slot[0]] = max(curve.get(slot[0], 0), current)
    return curve


def predicted_peak(graph: fx.Graph, info: remat.JointInfo, saved, recomputed,
                   scratch=None) -> int:
    """Most bytes of activations and gradients alive at once, extern scratch
    included where ``scratch`` is given (module docstring)."""
    return max(profile(graph, info, saved, recomputed, scratch).values(), default=0)


def pareto(graph: fx.Graph, info: remat.JointInfo, recomputable, unsavable,
           save_all_bytes: float, max_work: int = 200_000, scratch=None) -> list[dict]:
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
            "predicted_peak_bytes": predicted_peak(graph, info, saved, recomputed, scratch)})
    return table
