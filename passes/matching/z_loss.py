"""The z-loss beside a fused cross-entropy: ``logsumexp(logits, -1)``.

PaLM and OLMo add ``coef * mean(z ** 2)`` (OLMo masks the ignored rows) to
the loss, with ``z = torch.logsumexp(logits, -1)``: the logits' per-row
logsumexp, which the fused forward computes anyway (its second output). In
the joint graph (``aten.logsumexp`` held whole, decompositions.HELD) it is
one node over a logits node ``X``; autograd's backward of it reads ``X``
again, ``g_z[..., None] * exp(X - z[..., None])``, and adds that to ``X``'s
gradient. These helpers find both; passes/matching/cross_entropy.py asks
them while it walks the pattern, and the pass takes ``z`` from the fused
op's logsumexp and hands ``g_z`` to the fused backward (``g_z * softmax``
joins the per-row coefficient).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from retrograd.passes.op_classes import view_base

__all__ = ["z_users", "z_grad_add", "z_has_gradient"]

aten = torch.ops.aten


def _keepdim(node: fx.Node) -> bool:
    return bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))


def _is_logsumexp(user: fx.Node, node: fx.Node) -> bool:
    """``logsumexp(node, [last dim])`` (keepdim or not)."""
    if user.target is not aten.logsumexp.default or user.args[0] is not node:
        return False
    dims, rank = list(user.args[1]), len(node.meta["val"].shape)
    return rank >= 1 and len(dims) == 1 and dims[0] % rank == rank - 1


def _backward_sub(user: fx.Node, node: fx.Node) -> bool:
    """``sub(node, unsqueeze(alias(z)))`` with ``z`` a logsumexp of ``node``:
    the softmax in autograd's backward of that logsumexp."""
    if user.target is not aten.sub.Tensor or len(user.args) != 2 or user.kwargs or \
            user.args[0] is not node or not isinstance(user.args[1], fx.Node):
        return False
    return _is_logsumexp(view_base(user.args[1]), node)


def z_users(node: fx.Node, allowed: bool):
    """Split ``node``'s users: (the others, the logsumexps over its last dim);
    their backward's reads of ``node`` are in neither. A reason instead where
    there is such a logsumexp but ``allowed`` is false (a slice, a narrowing
    cast or the soft cap lies between ``node`` and the log-softmax)."""
    rest, zs = [], []
    for user in node.users:
        if _is_logsumexp(user, node):
            zs.append(user)
        elif not _backward_sub(user, node):
            rest.append(user)
    if zs and not allowed:
        return (f"logsumexp {zs[0].name} of the logits before a slice, a narrowing cast "
                "or the soft cap")
    return rest, zs


def z_has_gradient(z: fx.Node | None) -> bool:
    """Whether autograd's backward of the logsumexp ``z`` is in the graph."""
    return z is not None and any(_backward_sub(u, z.args[0]) and view_base(u.args[1]) is z
                                 for u in z.args[0].users)


def z_grad_add(add: fx.Node, grad: fx.Node, z: fx.Node | None) -> fx.Node | None:
    """If ``add`` is ``grad + g_z[..., None] * exp(X - z[..., None])`` (either
    order), autograd's backward of the logsumexp ``z`` of ``X`` joining
    ``X``'s gradient ``grad``: ``g_z`` (shaped like ``z``); else None."""
    if z is None or add.target is not aten.add.Tensor or len(add.args) != 2 or add.kwargs \
            or grad not in add.args:
        return None
    mul = add.args[1] if add.args[0] is grad else add.args[0]
    if not isinstance(mul, fx.Node) or mul.target is not aten.mul.Tensor or \
            len(mul.users) != 1 or len(mul.args) != 2:
        return None
    g_z, exp = mul.args
    if not isinstance(exp, fx.Node) or exp.target is not aten.exp.default or \
            len(exp.users) != 1:
        return None
    sub = exp.args[0]
    if len(sub.users) != 1 or not _backward_sub(sub, z.args[0]) or \
            view_base(sub.args[1]) is not z:
        return None
    if not _keepdim(z):
        if g_z.target is not aten.unsqueeze.default:
            return None
        g_z = g_z.args[0]
    if not isinstance(g_z, fx.Node) or tuple(g_z.meta["val"].shape) != \
            tuple(z.meta["val"].shape):
        return None
    return g_z
