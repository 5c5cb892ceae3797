"""Dead-code elimination, common-subexpression elimination, no-op views,
transposed matrix products written transposed, and unread results of masked
ops turned off.

What it does: removes nodes whose values nobody uses, merges nodes that
compute the same pure op on the same arguments, and bypasses views that
change nothing (a ``view`` or ``alias`` to the same shape) and fresh copies of
constants (``lift_fresh_copy``). Views that change what the elements mean
(``_conj``, ``_neg_view``, ``view_as_real``, ``view_as_complex``) are never
no-ops, and a layout counts as the same only with the same conjugate and
negative bits. A conjugate view of a Python number becomes that number. An
op with an ``output_mask`` (convolution backward, say) stops computing
results nothing reads. A sum ``x + index_put(zeros, i, v, accumulate=True)``
-- a tied embedding's two gradients: the output projection's plus the
embedding's scatter-add -- becomes ``index_put(x, i, v, accumulate=True)``:
the scatter adds into ``x`` instead of into a zeroed ``V x width`` buffer
that is then added, so one such buffer less is alive (the same sum in
another order of float additions, as scatter's atomic adds already are).

Assumes a functional ATen graph (AOTAutograd's joint graph): no node mutates
its inputs. Random ops are never merged (two dropouts are two masks), nor
are ops with side effects. Guarantees the graph still computes the same
values, in the same output order. The usual compiler cleanups, as in
torch.fx's own ``eliminate_dead_code`` and Inductor's CSE.

Requires: a functional ATen graph (no node mutates its inputs).
Ensures: the same values in the same output order (a scatter folded into a
  sum: up to the order of float additions); no dead node, no duplicate pure
  node, no no-op view.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from retrograd.ir import PassResult
from retrograd.passes.op_classes import (MASKED_OPS, MEANING_VIEWS, is_pure, is_view, same_sizes,
                                         view_base)

__all__ = ["run"]

aten = torch.ops.aten
CONSTANT_COPIES = {aten.lift_fresh_copy.default}
NO_OP_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.alias.default,
               aten.reshape.default}


def _key(node: fx.Node):
    def freeze(value):
        if isinstance(value, (list, tuple)):
            return (type(value).__name__,) + tuple(freeze(v) for v in value)
        if isinstance(value, dict):
            return tuple(sorted((k, freeze(v)) for k, v in value.items()))
        if isinstance(value, (bool, int, float)):
            # 1, 1.0 and True are equal in Python but promote differently
            # (x + 1.0 is float where x + 1 is int), and 0.0 == -0.0; the
            # repr tells them apart and makes NaN equal to itself.
            return (type(value).__name__, repr(value))
        return value
    try:
        key = (node.target, freeze(node.args), freeze(node.kwargs))
        hash(key)
    except TypeError:
        return None
    return key


def eliminate_common_subexpressions(graph: fx.Graph) -> int:
    seen: dict = {}
    merged = 0
    for node in list(graph.nodes):
        if not is_pure(node):
            continue
        key = _key(node)
        if key is None:
            continue
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
            merged += 1
        else:
            seen[key] = node
    return merged


def _same_layout(a, b) -> bool:
    """Same shape, strides, offset and dtype, and the same conjugate and
    negative bits (``_conj(x)`` has x's layout but not its values)."""
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) \
        and same_sizes(a.shape, b.shape) and same_sizes(a.stride(), b.stride()) \
        and same_sizes(a.storage_offset(), b.storage_offset()) \
        and a.dtype == b.dtype and a.is_conj() == b.is_conj() and a.is_neg() == b.is_neg()


def remove_no_op_views(graph: fx.Graph) -> int:
    output = next(node for node in graph.nodes if node.op == "output")
    removed = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and is_view(node) and node not in output.all_input_nodes \
                and node.target not in MEANING_VIEWS:
            root = view_base(node)
            if root is not node and _same_layout(node.meta.get("val"), root.meta.get("val")):
                node.replace_all_uses_with(root)   # views that undo each other
                graph.erase_node(node)
                removed += 1
                continue
        if node.op != "call_function" or node.target not in NO_OP_VIEWS | CONSTANT_COPIES:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or node in output.all_input_nodes:
            continue
        before, after = source.meta.get("val"), node.meta.get("val")
        # a functional graph never writes a constant, so its fresh copy is the constant
        constant_copy = node.target in CONSTANT_COPIES and source.op == "get_attr"
        if constant_copy or _same_layout(before, after):
            node.replace_all_uses_with(source)
            graph.erase_node(node)
            removed += 1
    return removed


#: Views of a Python number (AOTAutograd's backward of ``x * (1+2j)`` takes
#: ``_conj((1+2j))``): the number they stand for.
NUMBER_VIEWS = {aten._conj.default: lambda value: value.conjugate(),
                aten.conj.default: lambda value: value.conjugate(),
                aten._neg_view.default: lambda value: -value}


def fold_number_views(graph: fx.Graph) -> int:
    """``_conj(1+2j)`` -> ``1-2j`` in the users' arguments: a view needs a tensor
    to alias, and later passes read a view's first argument as a node. The
    users (``mul(tangent, _conj(1+2j))``) take the number as the wrapped
    scalar it was, so promotion is unchanged."""
    folded = 0
    for node in list(graph.nodes):
        fold = NUMBER_VIEWS.get(node.target) if node.op == "call_function" else None
        if fold is None or not isinstance(node.args[0], (bool, int, float, complex)):
            continue
        value = fold(node.args[0])
        if any(user.op != "call_function" for user in node.users):
            continue
        def swap(n, node=node, value=value):
            return value if n is node else n
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, swap)
            user.kwargs = fx.node.map_arg(user.kwargs, swap)
        graph.erase_node(node)
        folded += 1
    return folded


def transpose_matmuls(graph: fx.Graph) -> int:
    """``permute(mm(a, b), [1, 0])`` -> ``mm(b.T, a.T)`` when the transpose is the
    product's only user. Same values, but written contiguously: a weight
    gradient then has its parameter's layout, so autograd's AccumulateGrad
    keeps it instead of copying it (what eager's mm backward does)."""
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.permute.default \
                or list(node.args[1]) != [1, 0]:
            continue
        product = node.args[0]
        if not isinstance(product, fx.Node) or product.target is not aten.mm.default \
                or len(product.users) != 1:
            continue
        a, b = product.args
        with graph.inserting_before(node):
            b_t = graph.call_function(aten.permute.default, (b, [1, 0]))
            a_t = graph.call_function(aten.permute.default, (a, [1, 0]))
            swapped = graph.call_function(aten.mm.default, (b_t, a_t))
        b_t.meta["val"] = aten.permute.default(b.meta["val"], [1, 0])
        a_t.meta["val"] = aten.permute.default(a.meta["val"], [1, 0])
        swapped.meta["val"] = aten.mm.default(b_t.meta["val"], a_t.meta["val"])
        node.replace_all_uses_with(swapped)
        graph.erase_node(node)
        graph.erase_node(product)
        rewritten += 1
    return rewritten


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _row_operand(arg, shape, dim: int) -> bool:
    """A scalar, or a tensor of ``shape`` but for size 1 at ``dim``."""
    value = _val(arg)
    if not isinstance(value, torch.Tensor):
        return not isinstance(arg, fx.Node)
    return value.dim() == len(shape) and value.shape[dim] == 1 and all(
        size == shape[d] for d, size in enumerate(value.shape) if d != dim)


def _push_one(graph: fx.Graph, gather: fx.Node) -> fx.Node | None:
    """``gather(f(x, rows...), dim, index)`` -> ``f(gather(x, dim, index), rows...)``
    for a pointwise ``f`` whose other operands are constant along ``dim``."""
    source, dim, index = gather.args[:3]
    inner = source if isinstance(source, fx.Node) else None
    if inner is None or inner.op != "call_function" or len(gather.args) > 3 or gather.kwargs \
            or torch.Tag.pointwise not in getattr(inner.target, "tags", ()):
        return None
    shape = tuple(_val(inner).shape)
    if not shape:   # a 0-dim gather (its index is 0-dim too): nothing to move
        return None
    dim = dim % len(shape)
    if any(size != shape[d] for d, size in enumerate(_val(index).shape) if d != dim):
        return None
    full = [a for a in inner.args if isinstance(_val(a), torch.Tensor)
            and tuple(_val(a).shape) == shape]
    if len(full) != 1 or not all(a is full[0] or _row_operand(a, shape, dim) for a in inner.args) \
            or any(isinstance(v, fx.Node) for v in inner.kwargs.values()):
        return None
    with graph.inserting_before(gather):
        pushed = graph.call_function(aten.gather.default, (full[0], dim, index))
        pushed.meta["val"] = aten.gather.default(_val(full[0]), dim, _val(index))
        args = tuple(pushed if a is full[0] else a for a in inner.args)
        result = graph.call_function(inner.target, args, dict(inner.kwargs))
        result.meta["val"] = inner.target(*[_val(a) if isinstance(a, fx.Node) else a
                                            for a in args], **inner.kwargs)
    gather.replace_all_uses_with(result)
    graph.erase_node(gather)
    return pushed


def push_gathers(graph: fx.Graph) -> int:
    """Move each ``gather`` through the pointwise ops that made its source, as
    long as their other operands are constant along the gathered dimension:
    ``gather(x - amax - log(sum(exp(x - amax))), 1, target)`` (cross-entropy's
    log-softmax, then the target's entry) becomes ``gather(x, 1, target) -
    amax - log(...)``. An indexed read needs its source in memory; now that
    source is the logits, which are there anyway, and the full log-softmax
    need not be written (Liger's and Inductor's fused cross-entropy avoid it
    the same way)."""
    pushed = 0
    for node in list(graph.nodes):
        while node is not None and node.op == "call_function" \
                and node.target is aten.gather.default:
            node = _push_one(graph, node)
            pushed += node is not None
    return pushed


def narrow_output_masks(graph: fx.Graph) -> int:
    """Turn off the results of masked ops (convolution backward's grad_weight,
    say) that nothing reads, so the op does not compute them: dead code
    elimination removes the unread ``getitem`` but not the work inside the call."""
    narrowed = 0
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in MASKED_OPS:
            continue
        mask = list(node.args[-1])
        read = {user.args[1] for user in node.users if user.target is operator.getitem}
        if any(user.target is not operator.getitem for user in node.users):
            continue
        new = [bool(on) and index in read for index, on in enumerate(mask)]
        if new != mask and any(new):
            node.args = (*node.args[:-1], new)
            narrowed += mask.count(True) - new.count(True)
    return narrowed


def _zero_scatter_add(node) -> bool:
    """``index_put(zeros, indices, values, accumulate=True)``, read once."""
    if not isinstance(node, fx.Node) or node.target is not aten.index_put.default or \
            len(node.args) < 4 or node.args[3] is not True or len(node.users) != 1:
        return False
    base = node.args[0]
    zeros = base.target is aten.zeros.default or base.target is aten.full.default and \
        base.args[1] == 0
    return zeros and len(base.users) == 1


def scatter_into_sums(graph: fx.Graph) -> int:
    """``add(x, index_put(zeros, i, v, True))`` -> ``index_put(x, i, v, True)``
    where ``x`` has the sum's shape and dtype (no broadcast, no promotion)."""
    folded = 0
    for node in list(graph.nodes):
        if node.target is not aten.add.Tensor or len(node.args) != 2 or node.kwargs:
            continue
        for scatter, other in (node.args, node.args[::-1]):
            if not (_zero_scatter_add(scatter) and isinstance(other, fx.Node)):
                continue
            want, have = _val(node), _val(other)
            if have is None or want is None or have.shape != want.shape or \
                    have.dtype != want.dtype or _val(scatter).dtype != want.dtype or \
                    _val(scatter).shape != want.shape:
                continue
            with graph.inserting_before(node):
                summed = graph.call_function(aten.index_put.default,
                                             (other, *scatter.args[1:]))
            summed.meta = {**scatter.meta, "val": want}
            node.replace_all_uses_with(summed)
            folded += 1
            break
    return folded


def run(gm: fx.GraphModule, ctx) -> PassResult:
    """The rewrites above, then dead-code elimination; ``dead_nodes_removed``
    counts the nodes it took out (dead in the input, or left unread by a
    rewrite: the log-softmax a pushed gather no longer reads)."""
    transposed = transpose_matmuls(gm.graph)
    views = remove_no_op_views(gm.graph) + fold_number_views(gm.graph)
    gathers = push_gathers(gm.graph)
    scatters = scatter_into_sums(gm.graph)
    merged = eliminate_common_subexpressions(gm.graph)
    alive = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    dead = alive - len(gm.graph.nodes)
    narrowed = narrow_output_masks(gm.graph)
    gm.recompile()
    return PassResult(gm, {"dead_nodes_removed": dead, "common_subexpressions_merged": merged,
                           "no_op_views_removed": views, "matmuls_transposed": transposed,
                           "masked_results_dropped": narrowed, "gathers_pushed": gathers,
                           "scatters_into_sums": scatters})
