"""Dead-gradient elimination: compute only the gradients someone uses.

What it does, on the joint graph: (1) gradient outputs nobody asked for
(``ctx.gradients.wanted``: the primal positions whose gradient is wanted,
None for all) become ``None``; (2) tangents known to be zero
(``ctx.gradients.zero_tangents``: positions among the tangents, e.g. the
auxiliary outputs of ``value_and_grad(..., has_aux=True)``) are propagated as
symbolic zeros through the backward: a product, matrix product, view,
reduction, cast or negation of a zero is zero; a sum with a zero is its other
term; a gradient output that comes out zero becomes an explicit zero fill.
Then dead code is removed, so every node that only fed unwanted or zero
gradients is gone.

Assumes AOTAutograd's joint graph (outputs: forward outputs, then one
gradient per primal). Guarantees the wanted gradients are unchanged. This is
the symbolic-zero propagation of JAX's linearize/transpose and of
AOTAutograd's own handling of ``None`` tangents, applied after tracing so
the faces can say what they need at compile time.

Requires: AOTAutograd's joint graph; ctx.num_fwd_outputs; ctx.gradients (what
  the caller needs, or None).
Ensures: the wanted gradients unchanged; unwanted ones and known zeros are
  zero fills; no node feeds only them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from retrograd.ir import PassResult
from retrograd.passes.op_classes import same_sizes

__all__ = ["run", "GradientSpec"]

aten = torch.ops.aten

#: Ops whose result is zero when any listed tensor argument is zero.
ZERO_IF_ANY = {aten.mul.Tensor, aten.mm.default, aten.bmm.default}
#: Ops whose result is zero when their first argument is zero.
ZERO_IF_FIRST = {aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.neg.default,
                 aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.clone.default,
                 aten._to_copy.default, aten.view.default, aten._unsafe_view.default,
                 aten.permute.default, aten.expand.default, aten.unsqueeze.default,
                 aten.squeeze.dim, aten.squeeze.dims, aten.alias.default,
                 aten.slice.Tensor, aten.select.int, aten.reshape.default}
#: Sums: zero when every term is; otherwise the non-zero term if the shapes agree.
SUMS = {aten.add.Tensor, aten.sub.Tensor}


@dataclass(frozen=True)
class GradientSpec:
    """What the caller needs: wanted primal gradients, tangents known zero."""

    wanted: tuple[int, ...] | None = None
    zero_tangents: tuple[int, ...] = ()
    live_tangents: tuple[int, ...] | None = None   # if given, every other tangent is zero


def _is_zero_product(node: fx.Node, zero: set) -> bool:
    target = node.target
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    if target in ZERO_IF_ANY:
        return any(a in zero for a in tensors)
    if target in ZERO_IF_FIRST:
        # x / 0 is not zero: only the numerator counts for div
        return bool(node.args) and node.args[0] in zero
    if target in SUMS:   # a scalar term counts: 0 + 1 is not zero
        return bool(tensors) and all(a in zero if isinstance(a, fx.Node) else a == 0
                                     for a in node.args[:2])
    if target is aten.where.self:
        return node.args[1] in zero and node.args[2] in zero
    return False


def _other_term(node: fx.Node, zero: set) -> fx.Node | None:
    """``x + 0`` (or ``x - 0``) is ``x`` when ``x`` already has the result's shape."""
    if node.target not in SUMS or node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = node.args[:2]
    if b in zero and isinstance(a, fx.Node) and a not in zero:
        keep = a
    elif a in zero and node.target is aten.add.Tensor and isinstance(b, fx.Node):
        keep = b
    else:
        return None
    same = keep.meta.get("val") is not None and \
        same_sizes(keep.meta["val"].shape, node.meta["val"].shape) and \
        keep.meta["val"].dtype == node.meta["val"].dtype
    return keep if same else None


def _zero_fill(graph: fx.Graph, like: fx.Node, before: fx.Node) -> fx.Node:
    val = like.meta["val"]
    with graph.inserting_before(before):
        fill = graph.call_function(aten.full.default, (list(val.shape), 0),
                                   {"dtype": val.dtype, "device": val.device})
    fill.meta["val"] = torch.zeros_like(val)
    return fill


def _bytes(node) -> int:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.numel() * val.element_size() if isinstance(val, torch.Tensor) else 0


def run(joint: fx.GraphModule, ctx) -> PassResult:
    num_fwd_outputs = ctx.num_fwd_outputs
    spec: GradientSpec = ctx.gradients or GradientSpec()
    graph = joint.graph
    before = len(graph.nodes)
    output = next(n for n in graph.nodes if n.op == "output")
    results = list(output.args[0])
    grads = results[num_fwd_outputs:]
    never = 0
    if spec.wanted is not None:
        for position, grad in enumerate(grads):
            if position not in spec.wanted and grad is not None:
                never += _bytes(grad)
                grads[position] = None
    tangents = [n for n in graph.nodes if n.op == "placeholder" and n.name.startswith("tangents")]
    zero = {tangents[i] for i in spec.zero_tangents if i < len(tangents)}
    if spec.live_tangents is not None:
        zero |= {t for i, t in enumerate(tangents) if i not in spec.live_tangents}
    for node in list(graph.nodes):
        if node.op != "call_function" or node in zero:
            continue
        if _is_zero_product(node, zero):
            zero.add(node)
            continue
        other = _other_term(node, zero)
        if other is not None:
            node.replace_all_uses_with(other)
            grads = [other if g is node else g for g in grads]   # the output list is rebuilt below
    for position, grad in enumerate(grads):
        if isinstance(grad, fx.Node) and grad in zero:
            never += _bytes(grad)
            grads[position] = _zero_fill(graph, grad, output)
    output.args = (results[:num_fwd_outputs] + grads,)
    graph.eliminate_dead_code()
    joint.recompile()
    return PassResult(joint, {
        "nodes_removed": before - len(graph.nodes),
        "gradient_bytes_never_computed": never,
        "unwanted_gradients": 0 if spec.wanted is None else
        sum(1 for i, g in enumerate(results[num_fwd_outputs:])
            if g is not None and i not in spec.wanted),
        "zero_tangents": len(zero & set(tangents))})
