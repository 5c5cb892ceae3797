"""Offload: saved activations cross to the backward in host memory.

What it does: a third choice beside save and recompute. A saved activation
``x`` chosen here is copied to host memory right after its last forward
reader (``retrograd::offload``), crosses to the backward as that host
tensor, and is copied back before its first backward reader
(``retrograd::prefetch`` starts the copy some kernels ahead,
``retrograd::reload`` waits for it at the reader; runtime/offload.py has the
ops, the CUDA streams and the CPU stand-in). On the device ``x`` lives only
until its copy out and again from its prefetch, not across the whole gap.

Which values: those the ``offload=`` option names (an op or fx node name, as
``save=``; the checkpoint saves them, never recomputes them), or, without the
option and only on CUDA, the planner's choice (``planning/offload.py``: dear
to recompute, large, and the copies hide behind compute by a bandwidth
model). On the CPU only the option offloads: there is nothing to gain.
A value is never offloaded when it is a view, is returned to the user too,
shares its storage with another saved value, or is not dense; the stats say
why (``kept``).

Runs after checkpoint on the forward/backward pair (``run``) and on
compile_step's one graph (``offload_step``).

Requires: checkpoint's (forward, backward) with ctx.num_fwd_outputs (run);
  the step graph with phases tagged (offload_step).
Ensures: the same values; each offloaded activation crosses as a host
  tensor, read back on the device before its first backward reader.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from retrograd.ir import PassResult
from retrograd.passes.op_classes import PHASE, is_view, view_base
from retrograd.passes.planning import offload as model
from retrograd.passes.planning import patterns
from torch import fx
from torch._prims_common import is_non_overlapping_and_dense_or_false as _dense

__all__ = ["offload_step", "run"]


@dataclass
class _Saved:
    """A saved activation: its forward node, its backward readers' stand-in
    (the backward placeholder, or the node itself in a step graph), the
    forward's readers of it, and the backward's."""

    node: fx.Node
    value: fx.Node
    forward_readers: list
    backward_readers: list


def _ops():
    """The copy ops, registered by runtime/offload.py (which the compiler
    imports: passes never import the runtime)."""
    return torch.ops.retrograd


def _why_kept(saved: _Saved, held: set, shared: set) -> str | None:
    """Why ``saved`` cannot be offloaded, or None."""
    val = saved.node.meta.get("val")
    if saved.node.op != "call_function" or not isinstance(val, torch.Tensor):
        return "not a tensor the program computes"
    if is_view(saved.node) or view_base(saved.node, through_items=True).op == "placeholder":
        return "a view (its base holds the storage)"
    if saved.node in held:
        return "returned to the caller too"
    if saved.node in shared:
        return "another saved value is a view of it"
    if not _dense(val):
        return "not dense"
    if not saved.backward_readers:
        return "no backward reader"
    return None


def _timeline(nodes) -> dict[fx.Node, tuple[float, float]]:
    """(start, end) model seconds of each node run in order."""
    times, clock = {}, 0.0
    for node in nodes:
        start = clock
        clock += model.node_seconds(node)
        times[node] = (start, clock)
    return times


def _choose(items: list[_Saved], ctx, forward_nodes, backward_nodes):
    """{saved: reason} for the values to offload, and the model's prefetch
    start (seconds into the backward) of each."""
    options = ctx.options
    if not options.offload and not _on_cuda(items):
        return {}, {}, {}   # nothing asked, and on the CPU nothing to gain
    forward_times, backward_times = _timeline(forward_nodes), _timeline(backward_nodes)
    forward_end = max((end for _, end in forward_times.values()), default=0.0)

    def candidate(item: _Saved) -> model.Candidate:
        val = item.node.meta["val"]
        last = max(item.forward_readers, key=lambda n: forward_times[n][1], default=item.node)
        first = min(item.backward_readers, key=lambda n: backward_times[n][0])
        return model.Candidate(item.node.name, val.numel() * val.element_size(),
                               forward_times.get(last, (0.0, 0.0))[1],
                               backward_times[first][0],
                               model.dear(item.node, ctx.op_support))

    chosen: dict[str, tuple[_Saved, str]] = {}
    if options.offload:
        for item in items:
            named = sorted(patterns.node_names(item.node) & set(options.offload))
            if named:
                chosen[item.node.name] = (item, f"offload={named[0]}")
    elif _on_cuda(items):
        picked = model.choose([candidate(item) for item in items], forward_end)
        by_name = {item.node.name: item for item in items}
        for c in picked:
            chosen[c.name] = (by_name[c.name], (
                f"auto: dear to recompute ({model.remat.flops(by_name[c.name].node)} FLOPs), "
                f"copies of {model.copy_seconds(c.nbytes) * 1e3:.3f} ms each way hide "
                f"behind compute ({model.PCIE_BYTES / 1e9:.0f} GB/s PCIe model)"))
    starts = model.latest_starts([candidate(item) for item, _ in chosen.values()])
    return chosen, starts, backward_times


def _on_cuda(items: list[_Saved]) -> bool:
    return any(getattr(item.node.meta.get("val"), "device", None) is not None
               and item.node.meta["val"].device.type == "cuda" for item in items)


def _anchor(first: fx.Node, start: float, backward_times, backward_nodes) -> fx.Node | None:
    """The backward value the prefetch runs after: the last one ending by the
    model's start, at least one computing node before the first reader."""
    anchor = None
    for node in backward_nodes:
        if node is first:
            break
        if backward_times[node][1] <= start and node.op == "call_function" and \
                isinstance(node.meta.get("val"), torch.Tensor):
            anchor = node
    return anchor


def _host_value(val: torch.Tensor) -> torch.Tensor:
    return val.new_empty(tuple(val.shape), device="cpu")


def _insert_offload(graph: fx.Graph, item: _Saved, asynchronous: bool) -> fx.Node:
    """``offload(x)`` right after x's last forward reader (or x itself)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    last = max(item.forward_readers + [item.node], key=order.__getitem__)
    with graph.inserting_after(last):
        host = graph.create_node("call_function", _ops().offload.default,
                                 (item.node, asynchronous), name=f"offload_{item.node.name}")
    host.meta["val"] = _host_value(item.node.meta["val"])
    return host


def _insert_reload(graph: fx.Graph, item: _Saved, host: fx.Node, anchor, asynchronous: bool,
                   phase: str | None) -> fx.Node:
    """``prefetch`` after ``anchor`` (else before the first reader) and
    ``reload`` before the first backward reader; the readers read the reload."""
    val = item.node.meta["val"]
    order = {n: i for i, n in enumerate(graph.nodes)}
    first = min(item.backward_readers, key=order.__getitem__)
    shape, stride = [int(s) for s in val.shape], [int(s) for s in val.stride()]
    ops = _ops()
    if anchor is not None and order[anchor] < order[host]:   # a step graph: after the copy out
        anchor = None
    where = graph.inserting_after(anchor) if anchor is not None else graph.inserting_before(first)
    with where:
        token = graph.create_node("call_function", ops.prefetch.default, (
            host, shape, stride, val.device, anchor, asynchronous),
            name=f"prefetch_{item.node.name}")
    with graph.inserting_before(first):
        device_value = graph.create_node("call_function", ops.reload.default, (
            host, token, shape, stride, val.device), name=f"reload_{item.node.name}")
    token.meta["val"] = val.new_empty((), dtype=torch.int64, device="cpu")
    device_value.meta["val"] = val
    for node in (token, device_value):
        if phase is not None:
            node.meta[PHASE] = phase
    for reader in item.backward_readers:
        reader.replace_input_with(item.value, device_value)
    return device_value


def _shared(nodes) -> set:
    """Saved values that another saved value is a view of."""
    return {view_base(n, through_items=True) for n in nodes
            if view_base(n, through_items=True) is not n}


def _stats(items, chosen, kept, asked: bool) -> dict:
    offloaded = [name for name in chosen]
    nbytes = sum(item.node.meta["val"].numel() * item.node.meta["val"].element_size()
                 for item, _ in chosen.values())
    return {"offloaded": offloaded, "offloaded_bytes": int(nbytes),
            "reasons": {name: reason for name, (_, reason) in chosen.items()},
            "choice": "offload option" if asked else "auto (bandwidth model)",
            "kept": kept, "candidates": len(items)}


def _filter(items: list[_Saved], held: set, ctx) -> tuple[list[_Saved], dict[str, str]]:
    shared = _shared([item.node for item in items])
    usable, kept = [], {}
    for item in items:
        why = _why_kept(item, held, shared)
        if why is None:
            usable.append(item)
        elif ctx.options.offload and patterns.node_names(item.node) & set(ctx.options.offload):
            kept[item.node.name] = why
    return usable, kept


def _not_saved(nodes, items: list[_Saved], kept: dict[str, str], options) -> None:
    """Name in ``kept`` the forward nodes a pattern names that do not cross to
    the backward at all (recomputed there, or not read by it)."""
    crossing = {item.node for item in items}
    for node in nodes:
        if node.op == "call_function" and node not in crossing and node.name not in kept \
                and patterns.node_names(node) & set(options.offload):
            kept[node.name] = "not saved for the backward (recomputed there, or not read)"


def run(halves, ctx) -> PassResult:
    """Offload on checkpoint's (forward, backward) pair."""
    forward, backward = halves
    count = ctx.num_fwd_outputs
    patterns.check([forward.graph, backward.graph], (), (), ctx.graph_name,
                   offload=ctx.options.offload)
    output = next(n for n in reversed(forward.graph.nodes) if n.op == "output")
    outputs = list(output.args[0])
    placeholders = {n.name: n for n in backward.graph.nodes if n.op == "placeholder"}
    items = []
    for node in outputs[count:]:
        if isinstance(node, fx.Node) and node.name in placeholders:
            value = placeholders[node.name]
            readers = [u for u in node.users if u.op != "output"]
            items.append(_Saved(node, value, readers, list(value.users)))
    held = {n for n in outputs[:count] if isinstance(n, fx.Node)}
    items, kept = _filter(items, held, ctx)
    _not_saved(forward.graph.nodes, items, kept, ctx.options)
    chosen, starts, times = _choose(items, ctx, list(forward.graph.nodes),
                                    list(backward.graph.nodes))
    asynchronous = not ctx.options.verify
    backward_nodes = list(backward.graph.nodes)
    for name, (item, _) in chosen.items():
        host = _insert_offload(forward.graph, item, asynchronous)
        outputs[outputs.index(item.node, count)] = host
        first = min(item.backward_readers, key=backward_nodes.index)
        anchor = _anchor(first, starts.get(name, 0.0), times, backward_nodes)
        item.value.meta["val"] = _host_value(item.node.meta["val"])
        item.value.meta.pop("tensor_meta", None)
        _insert_reload(backward.graph, item, item.value, anchor, asynchronous, None)
    output.args = (tuple(outputs),) if isinstance(output.args[0], tuple) else (outputs,)
    for module in (forward, backward):
        module.graph.lint()
        module.recompile()
    return PassResult((forward, backward), _stats(items, chosen, kept, bool(ctx.options.offload)))


def offload_step(step: fx.GraphModule, ctx) -> PassResult:
    """Offload inside compile_step's one graph: forward values that backward
    nodes read (phases from checkpoint.rematerialize)."""
    graph = step.graph
    patterns.check(graph, (), (), ctx.graph_name, offload=ctx.options.offload)
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    phase = {n: n.meta.get(PHASE) for n in nodes}
    output = nodes[-1]
    items = []
    for node in nodes:
        if phase[node] != "forward":
            continue
        backward = [u for u in node.users if phase.get(u) == "backward"]
        forward = [u for u in node.users if phase.get(u) == "forward"]
        if backward and min(map(position.get, backward)) > max(map(position.get, forward),
                                                               default=-1):
            items.append(_Saved(node, node, forward, backward))   # else read before its copy
    held = set(output.all_input_nodes)
    items, kept = _filter(items, held, ctx)
    forward_nodes = [n for n in nodes if phase[n] == "forward"]
    _not_saved(forward_nodes, items, kept, ctx.options)
    backward_nodes = [n for n in nodes if phase[n] == "backward"]
    chosen, starts, times = _choose(items, ctx, forward_nodes, backward_nodes)
    asynchronous = not ctx.options.verify
    for name, (item, _) in chosen.items():
        host = _insert_offload(graph, item, asynchronous)
        host.meta[PHASE] = "forward"
        first = min(item.backward_readers, key=backward_nodes.index)
        anchor = _anchor(first, starts.get(name, 0.0), times, backward_nodes)
        _insert_reload(graph, item, host, anchor, asynchronous, "backward")
    graph.lint()
    step.recompile()
    return PassResult(step, _stats(items, chosen, kept, bool(ctx.options.offload)))

