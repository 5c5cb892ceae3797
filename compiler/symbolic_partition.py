"""retrograd's checkpoint plan on a symbolic joint graph, costed at the size hints.

A symbolic program's joint graph (dynamic.py) has sizes that are symbols
(``s0``): the checkpoint pass (passes/checkpoint.py) costs a value by its
bytes, and asking a symbolic tensor for its bytes would either fail or, by
turning ``s0`` into a number, add a guard that fixes the size. So the plan
is made on a *hinted copy* of the joint graph: the same nodes, under the
same names, whose values are fake tensors of the sizes the trace was made
at (each symbol's hint, as torch's ``min_cut_rematerialization_partition``
costs with ``optimization_hint``). The checkpoint pass runs on that copy as
on any static graph (min-cut, ``memory_budget``, ``save=``/``recompute=``,
the ledger); what it chose (the saved values, the recomputed ones) is then
applied to the symbolic graph by AOTAutograd's own extraction, with the
size computations (``sym_size`` nodes) the backward reads handed over as
symbols, as the default partition does.

Why a hint decides for every size: every byte count in these graphs is a
product of the same symbols, so the values the cut prefers at the hint are
those it prefers at other sizes, up to the value whose bytes do not grow
with a symbol (a bias, a per-feature statistic): a plan can then differ
from the exact best at a far size by such a value. The bytes it saves at
the hint are never more than what the default partition saves at the hint
(the default partition's set is one of the cuts the minimum is taken over).

Not applied, each for a stated reason (``symbolic_partition_skipped``):
a program that writes an input in place (the pass's copies of mutated
inputs are not replayed on the symbolic graph), and the ``dead_gradient``
and ``cleanup`` passes, which compare shapes (a no-op view, a sum whose
terms agree) and would fix sizes by guarding on them; fx's dead-code
elimination, which reads no size, runs instead.
"""

from __future__ import annotations

import logging
from typing import Any

import sympy
import torch
from retrograd.dump import Dumper
from retrograd.passes import checkpoint
from retrograd.passes.planning.remat import storage_base
from retrograd.pipeline import OpSupport, PassContext
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import optimization_hint

__all__ = ["hinted_copy", "partition", "saved_bytes_expression", "size_of_hint"]

log = logging.getLogger("retrograd")

#: What a symbol with no hint counts as (torch's partitioner uses the same).
FALLBACK = 4096


def size_of_hint(size: Any) -> int:
    """A size or stride as the number it was traced at, without a guard."""
    return optimization_hint(size, fallback=FALLBACK) if isinstance(size, torch.SymInt) \
        else int(size)


def _hinted_value(value: Any, mode: FakeTensorMode) -> Any:
    """``value`` with every symbolic size replaced by its hint: a fake tensor
    of a shape-env-free fake mode, a number, or a tuple of them."""
    if isinstance(value, torch.Tensor):
        with mode:
            return torch.empty_strided([size_of_hint(s) for s in value.shape],
                                       [size_of_hint(s) for s in value.stride()],
                                       dtype=value.dtype, device=value.device)
    if isinstance(value, torch.SymInt):
        return size_of_hint(value)
    if isinstance(value, torch.SymFloat):
        return float(value.node.hint) if value.node.hint is not None else 1.0
    if isinstance(value, torch.SymBool):
        return bool(value.node.hint) if value.node.hint is not None else True
    if isinstance(value, (tuple, list)):
        return type(value)(_hinted_value(item, mode) for item in value)
    return value


def hinted_copy(joint: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``joint`` (same node names and metadata) whose values have the
    sizes of the trace; planning on it adds no guard to the symbolic one."""
    graph = fx.Graph()
    graph.graph_copy(joint.graph, {}, return_output_node=False)
    copied = {node.name: node for node in graph.nodes}
    source = next(node for node in reversed(joint.graph.nodes) if node.op == "output")
    output = graph.output(fx.map_arg(source.args[0], lambda node: copied[node.name]))
    output.meta = dict(source.meta)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    numbers = []
    for node in graph.nodes:
        node.meta = dict(node.meta)
        node.meta.pop("tensor_meta", None)
        if _is_symbolic_number(node):
            numbers.append(node)
        if "val" in node.meta:
            node.meta["val"] = _hinted_value(node.meta["val"], mode)
    _inline_numbers(graph, numbers)
    hinted = fx.GraphModule(joint, graph)
    names = {n.name for n in joint.graph.nodes}
    if any(n.name not in names for n in hinted.graph.nodes):
        raise AssertionError("retrograd: the hinted copy renamed nodes of the symbolic graph")
    return hinted


def _inline_numbers(graph: fx.Graph, numbers: list[fx.Node]) -> None:
    """Every size computation becomes its number at the hint, written into
    its readers: the planner then sees a view of ``[12, 8]``, not a backward
    that reads a value it cannot cost (a number is no tensor to save, and
    the symbolic split hands the backward every size it reads anyway)."""
    hints = {node: node.meta["val"] for node in numbers}
    for node in numbers:
        for user in list(node.users):
            user.args = fx.map_arg(user.args, lambda arg: hints.get(arg, arg))
            user.kwargs = fx.map_arg(user.kwargs, lambda arg: hints.get(arg, arg))
    for node in reversed(numbers):
        if node.op != "placeholder" and not node.users:
            graph.erase_node(node)


def _is_symbolic_number(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool))


def _extract(joint: fx.GraphModule, saved_names: set[str], forward_names: set[str],
             num_fwd_outputs: int) -> tuple[fx.GraphModule, fx.GraphModule]:
    """AOTAutograd's extraction of the symbolic halves around the plan's saved
    values; every size computation of the forward is offered to the backward
    (those it does not read are dropped by the extraction)."""
    saved = [n for n in joint.graph.nodes if n.name in saved_names
             and isinstance(n.meta.get("val"), torch.Tensor)]
    # every size computation that reads no tangent: the hinted copy inlined them
    # (so they are in no half of its split), and a recomputed view may need one
    tangent_side: set[fx.Node] = set()
    for node in joint.graph.nodes:
        if node.op == "placeholder" and node.name.startswith("tangents") or \
                any(arg in tangent_side for arg in node.all_input_nodes):
            tangent_side.add(node)
    symbols = [n for n in joint.graph.nodes if _is_symbolic_number(n)
               and n not in tangent_side and (n.op == "placeholder" or n.name in forward_names
                                              or n.op == "call_function")]
    forward, backward = checkpoint.extract(joint, saved, num_fwd_outputs, symbols)
    forward.recompile()
    backward.recompile()
    return forward, backward


def partition(joint: fx.GraphModule, num_fwd_outputs: int, options, name: str):
    """(forward, backward, stats) of ``joint`` split by retrograd's checkpoint
    plan made at the size hints; None where the plan does not apply (the
    reason logged), so the caller uses the default partition."""
    if checkpoint.mutated_inputs(joint):
        log.info("retrograd: %s: symbolic program writes an input in place: default "
                 "partition (the checkpoint pass's copies are not replayed symbolically)", name)
        return None
    joint.graph.eliminate_dead_code()
    joint.recompile()
    hinted = hinted_copy(joint)
    ctx = PassContext(options, Dumper(None, []), OpSupport(), name,
                      num_fwd_outputs=num_fwd_outputs)
    (forward_hint, backward_hint), stats = checkpoint.run(hinted, ctx)
    saved_names = {n.name for n in backward_hint.graph.nodes if n.op == "placeholder"
                   and not n.name.startswith("tangents")}
    forward_names = {n.name for n in forward_hint.graph.nodes}
    forward, backward = _extract(joint, saved_names, forward_names, num_fwd_outputs)
    checkpoint.sink_recomputation(backward, set(stats["recomputed"]))
    stats = dict(stats, saved_activation_bytes_expression=str(
        saved_bytes_expression(forward, backward)), sizes="the trace's size hints")
    return forward, backward, stats


def saved_bytes_expression(forward: fx.GraphModule, backward: fx.GraphModule):
    """The bytes of the activations the forward hands the backward, as an
    expression of the symbols (``32*s0``): inputs and their views left out,
    as checkpoint.saved_values counts them; one count per storage."""
    _, activations = checkpoint.saved_values(forward, backward)
    by_name = {n.name: n for n in forward.graph.nodes}
    bases, total = set(), sympy.Integer(0)
    for node in activations:
        base = storage_base(by_name.get(node.name, node))
        value = base.meta.get("val")
        if base in bases or not isinstance(value, torch.Tensor):
            continue
        bases.add(base)
        numel = value.numel()
        numel = numel.node.expr if isinstance(numel, torch.SymInt) else sympy.Integer(numel)
        total += numel * value.element_size()
    return sympy.expand(total)

