"""Fuse the last matmul and the cross-entropy: the logits are never held.

What it does, on the joint graph (a compile_step graph, or a forward
compiled without gradients, where only the forward half is fused): finds

    mm / addmm(hidden, weight^T [, bias])      # the output projection
      -> views, row slices, clones, casts       # 3-d view, causal shift, flatten, upcast
         [and once: c * tanh(x / c)]             # Gemma 2's final soft cap
      -> _log_softmax(dim=-1) -> nll_loss_forward(no class weights)
                                 [-> sum(dim=-1): label smoothing's row sums]

and, in the backward, ``nll_loss_backward -> _log_softmax_backward_data ->``
the inverse views, scatters and casts, down to the logits' gradient ``G``,
(where label smoothing adds its row values, broadcast, to the
log-probabilities' gradient: ``add(nll_loss_backward, expand(r))``), read
only by ``G @ W`` (hidden's gradient), ``G^T @ hidden`` (the weight's,
either orientation) and ``sum(G, 0)`` (the bias's). A match becomes one
``retrograd::linear_cross_entropy`` call in the forward (saving only hidden,
weight, target and the O(rows) logsumexp) and one
``..._backward`` call in the backward (compiler/loss_ops.py), both chunked
over rows. The row slices and views of the logits are replayed on the
hidden states (``h[:, :-1] @ W^T`` is ``(h @ W^T)[:, :-1]``), and hidden's
gradient is scattered back through their inverses.

Why in the joint graph and on whole ops: the decomposition table holds
``_log_softmax``, ``nll_loss_forward`` and their backward back
(decompositions.HELD), so the pattern is a handful of named nodes rather
than a dozen decomposed ones, and the backward is matched where autograd
wrote it; ``loss_ops.restore`` decomposes whatever this pass leaves, so
nothing after it sees a difference where no pattern matched.

Left alone, with the reason in the stats: logits or log-probabilities read
elsewhere (returned, z-loss, any reduction of the log-probabilities but the
row sum), class weights, a softmax not over the last dim, a reshape that mixes the
vocabulary dim, a logits gradient read by anything but the three products,
a soft cap whose gradient is not autograd's mul / tanh-derivative / div.

Chunk size: ``chunk_rows = min(CHUNK_BYTES * (memory_budget or 1) // (V * 4),
ceil(rows / MIN_CHUNKS))``, at least 1: a chunk's float32 logits take at most
4 MiB (less under a tighter budget) and at most an eighth of all the logits,
so the transient chunk stays small beside what the fusion saves.

Requires: a joint, step or inference graph traced with decompositions.HELD
  ops whole.
Ensures: each matched pattern's loss and gradients computed by the two fused
  ops; no node of size rows x V left from it; every other node unchanged.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from retrograd.ir import PassResult
from retrograd.passes.op_classes import is_pure, view_base

__all__ = ["run", "CHUNK_BYTES"]

aten = torch.ops.aten

#: The most bytes of float32 logits one chunk holds (scaled by memory_budget).
CHUNK_BYTES = 4 << 20
#: The fewest chunks the rows are cut into (where they have that many rows).
MIN_CHUNKS = 8

ROW_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}


def _cast_ops() -> set:
    ops = {aten._to_copy.default}
    prims = getattr(torch.ops, "prims", None)
    if prims is not None and hasattr(prims, "convert_element_type"):
        ops.add(prims.convert_element_type.default)
    return ops


CASTS = _cast_ops()
ROW_OPS = ROW_VIEWS | {aten.slice.Tensor, aten.clone.default, aten.alias.default} | CASTS
GRAD_ROW_OPS = ROW_VIEWS | {aten.slice_scatter.default, aten.clone.default,
                            aten.alias.default} | CASTS


@dataclass
class Match:
    """One linear + cross-entropy pattern, forward and (optionally) backward."""

    matmul: fx.Node
    chain: list[fx.Node]             # matmul output -> log_softmax input, in order
    log_softmax: fx.Node
    nll: fx.Node
    loss: fx.Node                    # getitem 0 of nll
    row_sums: list[fx.Node] = field(default_factory=list)   # sum(log_softmax, -1): smoothing
    cap: tuple[float, fx.Node] | None = None   # soft cap: (its value, the tanh node)
    nll_backward: fx.Node | None = None
    log_softmax_backward: fx.Node | None = None
    row_grad: fx.Node | None = None  # [rows]: the row sums' gradient, broadcast over V
    grad_hidden: list[fx.Node] = field(default_factory=list)     # G @ W
    grad_weight: list[fx.Node] = field(default_factory=list)     # G^T @ h: [V, D]
    grad_weight_t: list[fx.Node] = field(default_factory=list)   # h^T @ G: [D, V]
    grad_bias: list[fx.Node] = field(default_factory=list)       # sum(G, 0)


def _shape(node) -> tuple:
    return tuple(node.meta["val"].shape)


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _match_chain(log_softmax: fx.Node):
    """Walk up from the log-softmax input to the matmul; (matmul, chain) or a reason."""
    chain, node, vocab, cap = [], log_softmax.args[0], _shape(log_softmax)[-1], None
    while node.op == "call_function" and (node.target in ROW_OPS or cap is None and _soft_cap(
            node) is not None):
        if node.target not in ROW_OPS:   # softcap * tanh(x / softcap): Gemma 2
            cap = _soft_cap(node)
            node = cap[1].args[0].args[0]
            continue
        if len(node.users) != 1:
            return f"logits read elsewhere ({node.name})"
        reason = _row_op_reason(node, vocab)
        if reason is not None:
            return reason
        chain.insert(0, node)
        node = node.args[0]
    if node.op != "call_function" or node.target not in (aten.mm.default, aten.addmm.default):
        return f"logits not from a matmul ({node.name})"
    if len(node.users) != 1:
        return f"logits read elsewhere ({node.name})"
    return node, chain, cap


def _soft_cap(mul: fx.Node) -> tuple[float, fx.Node] | None:
    """``mul(tanh(div(x, c)), c)`` read once, its tanh read only by that mul
    and by its own derivative: (c, the tanh node); else None."""
    cap = mul.args[1] if mul.target is aten.mul.Tensor and len(mul.args) == 2 else None
    tanh = mul.args[0]
    if not isinstance(cap, (int, float)) or not cap or tanh.target is not aten.tanh.default \
            or len(mul.users) != 1:
        return None
    div = tanh.args[0]
    if div.target is not aten.div.Tensor or div.args[1] != cap or len(div.users) != 1:
        return None
    if not all(user is mul or _only_squares(user) for user in tanh.users):
        return None
    return float(cap), tanh


def _only_squares(node: fx.Node) -> bool:
    """An alias chain of the tanh read only by ``mul(a, a)`` (its derivative)."""
    if node.target is aten.mul.Tensor:
        return node.args[0] is node.args[1]
    return node.target is aten.alias.default and all(_only_squares(u) for u in node.users)


def _through_cap(user: fx.Node, node: fx.Node, match) -> str | None:
    """Which step of the soft cap's backward ``user`` is ("mul", "div",
    "tanh"), reading ``node``; None if it is none of them."""
    if user.target not in (aten.mul.Tensor, aten.div.Tensor) or user.args[0] is not node \
            or match.cap is None:
        return None
    other = user.args[1]
    if other == match.cap[0] and not isinstance(other, fx.Node):
        return "mul" if user.target is aten.mul.Tensor else "div"
    if user.target is aten.mul.Tensor and isinstance(other, fx.Node) and \
            other.target is aten.sub.Tensor and other.args[0] == 1 and \
            isinstance(other.args[1], fx.Node) and _only_squares(other.args[1]) and \
            view_base(other.args[1].args[0]) is match.cap[1]:
        return "tanh"
    return None


def _row_op_reason(node: fx.Node, vocab: int) -> str | None:
    """Why ``node`` is not an op on whole rows of the logits (None if it is)."""
    ndim = len(_shape(node.args[0]))
    if node.target in ROW_VIEWS and (_shape(node.args[0])[-1] != vocab
                                     or _shape(node)[-1] != vocab):
        return f"reshape {node.name} mixes the vocabulary dim"
    if node.target is aten.slice.Tensor and _slice_arguments(node)[0] % ndim == ndim - 1:
        return f"slice {node.name} cuts the vocabulary dim"
    if node.target in CASTS and (set(node.kwargs) - {"dtype"} or
                                 node.meta["val"].device != node.args[0].meta["val"].device):
        return f"copy {node.name} changes more than the dtype"
    return None


def _match_forward(log_softmax: fx.Node):
    """A Match for the forward half, or a reason it is left alone."""
    rank = len(_shape(log_softmax))
    if rank != 2:   # 0-d: one number; 1-d: one sample (nll_loss also takes those)
        return f"log-probabilities of rank {rank}, not rows x vocabulary"
    if log_softmax.args[1] % rank != rank - 1 or log_softmax.args[2]:
        return "log_softmax not over the last dim in its own dtype"
    found = _match_chain(log_softmax)
    if isinstance(found, str):
        return found
    nlls = [u for u in log_softmax.users if u.target is aten.nll_loss_forward.default]
    if len(nlls) != 1 or nlls[0].args[0] is not log_softmax:
        return "log-probabilities not read by one nll_loss"
    nll = nlls[0]
    if nll.args[2] is not None:
        return "class weights"
    row_sums = []
    for user in log_softmax.users:
        if user is nll or user.target is aten.nll_loss_backward.default:
            continue
        if _is_row_sum(user):
            row_sums.append(user)
        elif not _only_aliases_to_backward(user):
            return f"log-probabilities read elsewhere ({user.name})"
    items = {u.args[1]: u for u in nll.users if u.target is operator.getitem}
    if len(items) != len(nll.users) or 0 not in items:
        return "nll_loss result read whole"
    if 1 in items and any(u.target is not aten.nll_loss_backward.default
                          for u in items[1].users):
        return "total weight read elsewhere"
    return Match(found[0], found[1], log_softmax, nll, items[0], row_sums, found[2])


def _is_row_sum(node: fx.Node) -> bool:
    """``sum(log_softmax, -1)`` of the 2-d log-probabilities: what label
    smoothing reads (one value per row)."""
    return node.target is aten.sum.dim_IntList and len(node.args) >= 2 and \
        [dim % 2 for dim in node.args[1]] == [1] and node.kwargs.get("dtype") is None


def _only_aliases_to_backward(node: fx.Node) -> bool:
    if node.target is aten._log_softmax_backward_data.default:
        return True
    return node.target is aten.alias.default and all(
        _only_aliases_to_backward(u) for u in node.users)


def _match_backward(match: Match):
    """Fill the backward half of ``match``; None, or a reason it is left alone."""
    backs = [u for u in match.log_softmax.users if u.target is aten.nll_loss_backward.default]
    if not backs:
        return None
    if len(backs) != 1:
        return "more than one nll_loss_backward"
    back = backs[0]
    node = _only_user(back)
    if node is not None and node.target is aten.add.Tensor:
        node = _row_grad(match, back, node)
    if node is None or node.target is not aten._log_softmax_backward_data.default \
            or node.args[0] not in (back, *back.users):
        return "nll_loss_backward read elsewhere"
    match.log_softmax_backward = node
    steps = []
    while (user := _only_user(node)) is not None and (
            user.target in GRAD_ROW_OPS and (user.target is not aten.slice_scatter.default
                                             or user.args[1] is node)
            or _through_cap(user, node, match) is not None):
        steps.append(_through_cap(user, node, match))
        node = user
    if match.cap is not None and sorted(s for s in steps if s) != ["div", "mul", "tanh"]:
        return "the soft cap's gradient not as autograd writes it"
    if _shape(node) != _shape(match.matmul) or node.meta["val"].dtype != \
            match.matmul.meta["val"].dtype:
        return f"logits gradient {node.name} not shaped like the logits"
    match.nll_backward = back
    return _classify_grad_users(match, node)


def _row_grad(match: Match, back: fx.Node, add: fx.Node) -> fx.Node | None:
    """``add(nll_loss_backward, expand(row values))``, label smoothing's share
    of the log-probabilities' gradient: note the [rows] values in ``match``,
    return the add's one user."""
    other = add.args[1] if add.args[0] is back else add.args[0]
    if not match.row_sums or len(add.args) != 2 or add.kwargs or \
            not isinstance(other, fx.Node) or other.target is not aten.expand.default:
        return None
    rows = other.args[0]
    if rows.target is aten.unsqueeze.default and rows.args[1] in (1, -1):
        rows = rows.args[0]
    if _shape(rows) not in ((_shape(back)[0],), (_shape(back)[0], 1)):
        return None
    match.row_grad = rows
    return _only_user(add)


def _classify_grad_users(match: Match, grad: fx.Node):
    hidden, weight = view_base(match.matmul.args[-2]), view_base(match.matmul.args[-1])
    for user in grad.users:
        if user.target is aten.mm.default and user.args[0] is grad and \
                view_base(user.args[1]) is weight:
            match.grad_hidden.append(user)
        elif user.target is aten.mm.default and user.args[1] is grad and \
                view_base(user.args[0]) is hidden:
            match.grad_weight_t.append(user)
        elif user.target is aten.permute.default and all(
                u.target is aten.mm.default and u.args[0] is user
                and view_base(u.args[1]) is hidden for u in user.users):
            match.grad_weight.extend(user.users)
        elif user.target in (aten.sum.dim_IntList,) and list(user.args[1]) == [0] and \
                match.matmul.target is aten.addmm.default:
            match.grad_bias.append(user)
        else:
            return f"logits gradient read elsewhere ({user.name})"
    return None


class _Builder:
    """Adds nodes before ``anchor``, each with its fake value computed."""

    def __init__(self, graph: fx.Graph, mode):
        self.graph, self.mode = graph, mode

    def add(self, target, args, kwargs=None) -> fx.Node:
        node = self.graph.call_function(target, tuple(args), kwargs or {})
        values = fx.node.map_arg((tuple(args), kwargs or {}), lambda n: n.meta["val"])
        with self.mode:
            node.meta["val"] = target(*values[0], **values[1])
        return node


def _replay_rows(build: _Builder, match: Match, hidden: fx.Node) -> tuple[fx.Node, list]:
    """Apply the logits' row ops to ``hidden``; returns (rows, undo steps)."""
    undo = []
    for op in match.chain:
        width = _shape(hidden)[-1]
        if op.target in ROW_VIEWS:
            before = list(_shape(hidden))
            hidden = build.add(aten.view.default, [hidden, [*_shape(op)[:-1], width]])
            undo.append((aten.view.default, before))
        elif op.target is aten.slice.Tensor:
            before, where = list(_shape(hidden)), _slice_arguments(op)
            hidden = build.add(aten.slice.Tensor, [hidden, *where])
            undo.append((aten.slice_scatter.default, before, where))
        elif op.target is aten.clone.default:
            hidden = build.add(aten.clone.default, [hidden],
                               {"memory_format": torch.contiguous_format})
    return hidden, undo


def _slice_arguments(op: fx.Node) -> list:
    """``slice.Tensor``'s dim, start, end, step, given or defaulted."""
    names, defaults = ("dim", "start", "end", "step"), (0, None, None, 1)
    return [op.args[i + 1] if len(op.args) > i + 1 else op.kwargs.get(name, default)
            for i, (name, default) in enumerate(zip(names, defaults))]


def _undo_rows(build: _Builder, grad: fx.Node, undo: list) -> fx.Node:
    """Hidden's gradient back through the inverses of the replayed row ops."""
    for step in reversed(undo):
        if step[0] is aten.view.default:
            grad = build.add(aten.view.default, [grad, step[1]])
        else:
            val = grad.meta["val"]
            zeros = build.add(aten.full.default, [step[1], 0], {
                "dtype": val.dtype, "layout": torch.strided, "device": val.device,
                "pin_memory": False})
            grad = build.add(aten.slice_scatter.default, [zeros, grad, *step[2]])
    return grad


def _weight_rows(build: _Builder, matmul: fx.Node) -> fx.Node:
    """The weight as [V, D] (the matmul's right operand transposed)."""
    right = matmul.args[-1]
    if right.target is aten.permute.default and list(right.args[1]) == [1, 0]:
        return right.args[0]
    return build.add(aten.permute.default, [right, [1, 0]])


def _rewrite(graph: fx.Graph, match: Match, mode, chunk_rows: int) -> None:
    """The forward half becomes one fused call; then the backward half, if any."""
    build = _Builder(graph, mode)
    matmul, nll = match.matmul, match.nll
    bias = matmul.args[0] if matmul.target is aten.addmm.default else None
    common = [nll.args[1], nll.args[3], nll.args[4], match.log_softmax.meta["val"].dtype,
              chunk_rows, match.cap[0] if match.cap else 0.0]
    # target, reduction, ignore_index, logits dtype, chunk rows, soft cap
    with graph.inserting_before(nll):
        weight = _weight_rows(build, matmul)
        rows, undo = _replay_rows(build, match, matmul.args[-2])
        fused = build.add(torch.ops.retrograd.linear_cross_entropy.default,
                          [rows, weight, bias, *common])
        loss, lse, row_sums = (build.add(operator.getitem, [fused, i]) for i in range(3))
        for node in match.row_sums:
            node.replace_all_uses_with(build.add(aten.view.default,
                                                 [row_sums, list(_shape(node))]))
    match.loss.replace_all_uses_with(loss)
    if match.nll_backward is not None:
        _rewrite_backward(build, match, [rows, weight, bias, common[0], lse], common[1:], undo)


def _rewrite_backward(build: _Builder, match: Match, tensors: list, scalars: list,
                      undo: list) -> None:
    """The backward half: one fused call, its results in place of the products'."""
    rows_count = _shape(match.log_softmax)[0]
    with build.graph.inserting_before(match.log_softmax_backward):
        row_grad = match.row_grad and build.add(aten.view.default,
                                                [match.row_grad, [rows_count]])
        grads = build.add(torch.ops.retrograd.linear_cross_entropy_backward.default,
                          [match.nll_backward.args[0], *tensors, row_grad, *scalars,
                           bool(match.grad_weight or match.grad_weight_t),
                           bool(match.grad_bias)])
        grad_hidden = _undo_rows(build, build.add(operator.getitem, [grads, 0]), undo)
        grad_weight = build.add(operator.getitem, [grads, 1])
        grad_bias = build.add(operator.getitem, [grads, 2])
        if match.grad_weight_t:
            grad_weight_t = build.add(aten.permute.default, [grad_weight, [1, 0]])
    for nodes, value in ((match.grad_hidden, grad_hidden), (match.grad_weight, grad_weight)):
        for node in nodes:
            node.replace_all_uses_with(value)
    for node in match.grad_weight_t:
        node.replace_all_uses_with(grad_weight_t)
    for node in match.grad_bias:
        with build.graph.inserting_before(node):
            node.replace_all_uses_with(build.add(aten.view.default,
                                                 [grad_bias, list(_shape(node))]))


def _erase_dead(graph: fx.Graph) -> None:
    """Remove the nodes the rewrite left unread (pure ops only)."""
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and not node.users and is_pure(node):
            graph.erase_node(node)


def run(gm: fx.GraphModule, ctx) -> PassResult:
    graph = gm.graph
    budget = getattr(ctx.options, "memory_budget", None) or 1.0
    fused, avoided, chunks, left = 0, 0, [], []
    mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes if n.op == "placeholder"])
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten._log_softmax.default:
            continue
        match = _match_forward(node)
        reason = match if isinstance(match, str) else _match_backward(match)
        if reason is not None:
            left.append(f"{node.name}: {reason}")
            continue
        rows, vocab = _shape(node)
        chunk_rows = max(1, min(int(CHUNK_BYTES * budget) // (vocab * 4),
                                -(-rows // MIN_CHUNKS)))
        _rewrite(graph, match, mode, chunk_rows)
        fused += 1
        chunks.append(chunk_rows)
        held = 2 if match.nll_backward is not None else 1   # the logits and their gradient
        avoided += held * rows * vocab * node.meta["val"].element_size()
    if fused:
        _erase_dead(graph)
        gm.recompile()
    return PassResult(gm, {"fused": fused, "chunk_rows": chunks,
                           "logits_bytes_not_held": avoided, "left_alone": left})
