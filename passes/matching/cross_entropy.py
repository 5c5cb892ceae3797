"""Finding the linear + cross-entropy pattern that passes/linear_cross_entropy.py fuses.

``match_forward`` walks from a ``_log_softmax`` node up through the row ops
(views, a causal row slice, clones, casts, one soft cap) to the matmul, and
checks that its log-probabilities are read only by one ``nll_loss_forward``
(and label smoothing's row sums) and its logits only by the chain and at
most one z-loss ``logsumexp`` over their last dim (passes/matching/z_loss.py);
``match_backward`` follows autograd's backward of the same ops down to the
logits' gradient (the logsumexp's share added on the way) and checks it is
read only by the hidden-state, weight and bias products. Each returns a reason
where the pattern is left alone; the rewrite lives with the pass.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from retrograd.passes.matching.z_loss import z_grad_add, z_has_gradient, z_users
from retrograd.passes.op_classes import view_base

__all__ = ["Match", "match_forward", "match_backward", "too_small", "slice_arguments",
           "ROW_VIEWS", "shape"]

aten = torch.ops.aten

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
    z: fx.Node | None = None         # logsumexp(logits, -1): a z-loss's, read from the fused lse
    z_grad: fx.Node | None = None    # the z values' gradient (shaped like ``z``)


def shape(node) -> tuple:
    return tuple(node.meta["val"].shape)


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _match_chain(log_softmax: fx.Node):
    """Walk up from the log-softmax input to the matmul; (matmul, chain, cap,
    z) or a reason. ``z``: the one logsumexp over the last dim of a logits
    node with no slice, narrowing cast or soft cap between it and the
    log-softmax."""
    chain, node, vocab, cap = [], log_softmax.args[0], shape(log_softmax)[-1], None
    z, z_ok = None, True
    while True:
        found = z_users(node, z_ok)
        if isinstance(found, str):
            return found
        rest, zs = found
        if zs and z is not None or len(zs) > 1:
            return f"more than one logsumexp of the logits ({zs[0].name})"
        z = zs[0] if zs else z
        if node.op != "call_function" or not (
                node.target in ROW_OPS or cap is None and _soft_cap(node, rest) is not None):
            break
        if node.target not in ROW_OPS:   # softcap * tanh(x / softcap): Gemma 2
            cap, z_ok = _soft_cap(node, rest), False
            node = cap[1].args[0].args[0]
            continue
        if len(rest) != 1:
            return f"logits read elsewhere ({node.name})"
        reason = _row_op_reason(node, vocab)
        if reason is not None:
            return reason
        z_ok = z_ok and node.target is not aten.slice.Tensor and (
            node.target not in CASTS or _widening(node))
        chain.insert(0, node)
        node = node.args[0]
    if node.op != "call_function" or node.target not in (aten.mm.default, aten.addmm.default):
        return f"logits not from a matmul ({node.name})"
    if len(rest) != 1:
        return f"logits read elsewhere ({node.name})"
    return node, chain, cap, z


def _widening(cast: fx.Node) -> bool:
    """A cast that keeps every value (bf16 or fp16 -> fp32, fp32 -> fp64): a
    logsumexp before it reads the values the fused op's reads after it."""
    before, after = cast.args[0].meta["val"].dtype, cast.meta["val"].dtype
    return before.is_floating_point and after.is_floating_point and \
        after.itemsize > before.itemsize and torch.promote_types(before, after) == after


def _soft_cap(mul: fx.Node, readers: list) -> tuple[float, fx.Node] | None:
    """``mul(tanh(div(x, c)), c)`` read once (``readers``: its users but a
    z-loss's), its tanh read only by that mul and by its own derivative:
    (c, the tanh node); else None."""
    cap = mul.args[1] if mul.target is aten.mul.Tensor and len(mul.args) == 2 else None
    tanh = mul.args[0]
    if not isinstance(cap, (int, float)) or not cap or tanh.target is not aten.tanh.default \
            or len(readers) != 1:
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
    ndim = len(shape(node.args[0]))
    if node.target in ROW_VIEWS and (shape(node.args[0])[-1] != vocab
                                     or shape(node)[-1] != vocab):
        return f"reshape {node.name} mixes the vocabulary dim"
    if node.target is aten.slice.Tensor and slice_arguments(node)[0] % ndim == ndim - 1:
        return f"slice {node.name} cuts the vocabulary dim"
    if node.target in CASTS and (set(node.kwargs) - {"dtype"} or
                                 node.meta["val"].device != node.args[0].meta["val"].device):
        return f"copy {node.name} changes more than the dtype"
    return None


def match_forward(log_softmax: fx.Node):
    """A Match for the forward half, or a reason it is left alone."""
    rank = len(shape(log_softmax))
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
    return Match(found[0], found[1], log_softmax, nll, items[0], row_sums, found[2],
                 z=found[3])


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


def match_backward(match: Match):
    """Fill the backward half of ``match``; None, or a reason it is left alone."""
    backs = [u for u in match.log_softmax.users if u.target is aten.nll_loss_backward.default]
    if not backs:
        return "the z-loss has a gradient, the loss none" if z_has_gradient(match.z) else None
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
            or _through_cap(user, node, match) is not None
            or match.z_grad is None and z_grad_add(user, node, match.z) is not None):
        steps.append(_through_cap(user, node, match))
        if match.z is not None and match.z_grad is None:
            match.z_grad = z_grad_add(user, node, match.z)
        node = user
    if match.cap is not None and sorted(s for s in steps if s) != ["div", "mul", "tanh"]:
        return "the soft cap's gradient not as autograd writes it"
    if match.z_grad is None and z_has_gradient(match.z):
        return "the logsumexp's gradient not as autograd writes it"
    if shape(node) != shape(match.matmul) or node.meta["val"].dtype != \
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
    if shape(rows) not in ((shape(back)[0],), (shape(back)[0], 1)):
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


def slice_arguments(op: fx.Node) -> list:
    """``slice.Tensor``'s dim, start, end, step, given or defaulted."""
    names, defaults = ("dim", "start", "end", "step"), (0, None, None, 1)
    return [op.args[i + 1] if len(op.args) > i + 1 else op.kwargs.get(name, default)
            for i, (name, default) in enumerate(zip(names, defaults))]


def too_small(match: Match) -> str | None:
    """Why fusing ``match`` would not lower the peak (None if it would):
    the logits and their gradient no larger than the fused backward's
    weight-gradient accumulator. A forward alone always gains."""
    if match.nll_backward is None or not (match.grad_weight or match.grad_weight_t):
        return None
    (rows, vocab), logits = shape(match.log_softmax), match.log_softmax.meta["val"]
    width = shape(match.matmul.args[-2])[-1]
    held = 2 * rows * vocab * logits.element_size()
    accumulator = vocab * width * torch.empty(
        (), dtype=torch.promote_types(logits.dtype, torch.float32)).element_size()
    if held > accumulator:
        return None
    return (f"logits and their gradient ({held} bytes) no larger than the weight "
            f"gradient the fusion accumulates ({accumulator} bytes)")
