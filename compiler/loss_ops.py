"""Fused linear + cross-entropy as two custom ops, and the held-back decompositions.

``retrograd::linear_cross_entropy`` and its backward compute a language
model's loss from the hidden states and the output projection without ever
holding the ``rows x V`` logits: rows are taken ``chunk_rows`` at a time; per
chunk the logits chunk, its logsumexp and the loss terms; the backward
recomputes each chunk's logits, forms ``softmax - onehot`` from the saved
logsumexp (scaled by the incoming gradient; ignored rows zero; label
smoothing's share through the row sums of the log-probabilities), and
accumulates ``grad_hidden = P @ W``, ``grad_W += P^T @ h``, ``grad_b += sum P``.
Only ``h``, ``W``, the target and the O(rows) logsumexp are saved. This is
the row-chunked scheme of Liger-Kernel's fused linear cross-entropy (Hsu et
al., 2024) run as extern torch calls; Cut Cross-Entropy (Wijmans et al.,
2024) goes further with fused Triton kernels: compiler/cce_ops.py, same
arguments, used where the pass chooses them.

The numerics follow eager PyTorch's decomposed path: the matrix product in
the operands' dtype (bf16 under autocast), its result cast to the logits
dtype (the upcast ``logits.float()``), the logsumexp and the loss terms in
float32, the logits' gradient cast back to the operands' dtype before the
two products; ``grad_W`` and ``grad_b`` are accumulated in float32.

The pass ``passes/linear_cross_entropy.py`` finds the pattern in the joint
graph; it needs ``_log_softmax``, ``nll_loss_forward`` and their backward
undecomposed there, so the decomposition table holds them back (``HELD`` in
decompositions.py) and ``restore`` -- a required step of the pipeline --
decomposes every one left over, inlined with the table's own decomposition,
so a graph without the pattern reaches the later passes as before.

Requires: an fx graph traced with ``decomposition_table()`` (HELD ops whole).
Ensures: no HELD op remains; each one left over is replaced by the nodes the
  table's decomposition traces to, with the node's meta copied.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.fx.experimental.proxy_tensor import make_fx

from retrograd.decompositions import HELD, decomposition_table
from retrograd.ir import PassResult

__all__ = ["linear_cross_entropy", "linear_cross_entropy_backward", "restore"]

MEAN, SUM = 1, 2   # nll_loss's reduction codes (0: none)


def _chunk_logits(hidden, weight, bias, logits_dtype, softcap=0.0):
    """One chunk's logits as eager computes them, in float32 for what follows,
    soft-capped (``softcap * tanh(logits / softcap)``, Gemma 2) where
    ``softcap`` is not 0; then also ``tanh(logits / softcap)`` for the backward."""
    logits = hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())
    logits = logits.to(logits_dtype).to(_accumulate(logits_dtype))
    if not softcap:
        return logits, None
    tanh = logits.div_(softcap).tanh_()
    return tanh * softcap, tanh


def _accumulate(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 where the logits are float64."""
    return torch.promote_types(dtype, torch.float32)


def _valid_targets(target: torch.Tensor, ignore_index: int):
    valid = target != ignore_index
    return valid, torch.where(valid, target, 0)


def _row_weights(valid, safe, class_weight, dtype) -> torch.Tensor:
    """Each row's weight in the loss: its target's class weight (1 without
    class weights), 0 for an ignored row -- what nll_loss's mean divides by."""
    if class_weight is None:
        return valid.to(dtype)
    return torch.where(valid, class_weight.to(dtype)[safe], 0.0)


@torch.library.custom_op("retrograd::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                         bias: Optional[torch.Tensor], target: torch.Tensor,
                         class_weight: Optional[torch.Tensor], reduction: int,
                         ignore_index: int, logits_dtype: torch.dtype, chunk_rows: int,
                         softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``hidden @ weight.T + bias`` (rows x V, never held) against
    ``target`` (each row weighted by its target's ``class_weight``, if given);
    returns (loss, logsumexp per row in float32 -- float64 for float64 logits --,
    and each row's sum of log-probabilities in the logits' dtype, what label
    smoothing reads)."""
    rows, wide = hidden.shape[0], _accumulate(logits_dtype)
    # per chunk only what reads the logits (a row's logsumexp, its target's
    # logit, its sum); the per-row arithmetic once for all rows after the loop:
    # each torch call costs microseconds, and small models run many chunks
    lse, picked, sums = (torch.empty(rows, dtype=wide, device=hidden.device)
                         for _ in range(3))
    valid, safe = _valid_targets(target, ignore_index)
    column = safe[:, None]
    for start in range(0, rows, chunk_rows):
        stop = min(rows, start + chunk_rows)
        logits, _ = _chunk_logits(hidden[start:stop], weight, bias, logits_dtype, softcap)
        torch.logsumexp(logits, dim=-1, out=lse[start:stop])
        torch.gather(logits, 1, column[start:stop], out=picked[start:stop, None])
        torch.sum(logits, -1, out=sums[start:stop])
        del logits   # before the next chunk's: one chunk alive at a time
    row_weight = _row_weights(valid, safe, class_weight, wide)
    terms = torch.where(valid, row_weight * (lse - picked), 0.0)
    row_sums = sums - weight.shape[0] * lse
    if reduction == MEAN:
        loss = terms.sum() / row_weight.sum()
    elif reduction == SUM:
        loss = terms.sum()
    else:
        loss = terms
    return loss.to(logits_dtype), lse, row_sums.to(logits_dtype)


@linear_cross_entropy.register_fake
def _(hidden, weight, bias, target, class_weight, reduction, ignore_index, logits_dtype,
      chunk_rows, softcap):
    rows = hidden.shape[0]
    shape = (rows,) if reduction not in (MEAN, SUM) else ()
    return (hidden.new_empty(shape, dtype=logits_dtype),
            hidden.new_empty((rows,), dtype=_accumulate(logits_dtype)),
            hidden.new_empty((rows,), dtype=logits_dtype))


@torch.library.custom_op("retrograd::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(
        grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
        bias: Optional[torch.Tensor], target: torch.Tensor,
        class_weight: Optional[torch.Tensor], lse: torch.Tensor,
        row_grad: Optional[torch.Tensor], reduction: int,
        ignore_index: int, logits_dtype: torch.dtype, chunk_rows: int, softcap: float,
        weight_grad: bool, bias_grad: bool, z_grad: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``linear_cross_entropy``'s loss: (hidden, weight, bias);
    a gradient not wanted (``weight_grad``, ``bias_grad``: a frozen weight, no
    bias) is not computed and comes back empty (no elements). ``row_grad``: the
    gradient of each row's sum of log-probabilities (label smoothing), or None;
    ``z_grad``: the gradient of each row's logsumexp (a z-loss, which reads the
    forward's ``lse``), or None: it adds ``z_grad * softmax`` to the logits'."""
    valid, safe = _valid_targets(target, ignore_index)
    wide = _accumulate(logits_dtype)
    row_weight = _row_weights(valid, safe, class_weight, wide)
    scale = grad_loss.to(wide).expand(hidden.shape[0])
    if reduction == MEAN:
        scale = scale / row_weight.sum()
    scale = torch.where(valid, scale * row_weight, 0.0)
    # d/dlogits of the log-probabilities' gradient (-scale at the target, plus
    # row_grad everywhere): p * (scale - V row_grad) + row_grad - scale onehot
    row_grad = torch.zeros_like(scale) if row_grad is None else row_grad.to(wide)
    coefficient = scale - weight.shape[0] * row_grad
    if z_grad is not None:   # d logsumexp / d logits is the softmax
        coefficient = coefficient + z_grad.to(wide)
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros(weight.shape if weight_grad else (0,), dtype=wide,
                              device=weight.device)
    grad_bias = torch.zeros(weight.shape[0] if bias_grad else 0, dtype=wide,
                            device=weight.device)
    # the per-row columns made once, sliced per chunk (a view costs a call too)
    lse, coefficient, row_grad = lse[:, None], coefficient[:, None], row_grad[:, None]
    safe, minus_scale = safe[:, None], -scale[:, None]
    for start in range(0, hidden.shape[0], chunk_rows):
        stop = min(hidden.shape[0], start + chunk_rows)
        chunk = hidden[start:stop]
        # in place on the chunk's logits: softmax, minus the one-hot, scaled
        probs, tanh = _chunk_logits(chunk, weight, bias, logits_dtype, softcap)
        probs.sub_(lse[start:stop]).exp_()
        probs.mul_(coefficient[start:stop]).add_(row_grad[start:stop])
        probs.scatter_add_(1, safe[start:stop], minus_scale[start:stop])
        if tanh is not None:   # through the soft cap: times 1 - tanh^2
            probs.mul_(tanh.square_().neg_().add_(1))
            del tanh
        grad = probs.to(logits_dtype).to(hidden.dtype)
        del probs
        torch.mm(grad, weight, out=grad_hidden[start:stop])
        if weight_grad and grad_weight.dtype == grad.dtype:
            grad_weight.addmm_(grad.t(), chunk)
        elif weight_grad:
            grad_weight += (grad.t() @ chunk).to(wide)
        if bias_grad:
            grad_bias += grad.sum(0, dtype=wide)
        del grad
    bias_dtype = weight.dtype if bias is None else bias.dtype
    return grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(bias_dtype)


@linear_cross_entropy_backward.register_fake
def backward_fake(grad_loss, hidden, weight, bias, target, class_weight, lse, row_grad,
                  reduction, ignore_index, logits_dtype, chunk_rows, softcap, weight_grad,
                  bias_grad, z_grad=None):
    """Shapes of the backward's gradients (an unwanted one has no elements);
    also the CCE backward's (cce_ops.py: same arguments, same results)."""
    bias_dtype = weight.dtype if bias is None else bias.dtype
    return (torch.empty_like(hidden),
            weight.new_empty(weight.shape if weight_grad else (0,)),
            weight.new_empty((weight.shape[0] if bias_grad else 0,), dtype=bias_dtype))


def _value(arg):
    return arg.meta["val"] if isinstance(arg, fx.Node) else arg


def _decompose(graph: fx.Graph, node: fx.Node, table: dict, mode) -> None:
    """Replace ``node`` by the inlined trace of its decomposition."""
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    positions = [i for i, a in enumerate(node.args) if isinstance(a, fx.Node)]

    def call(*values):
        args = list(node.args)
        for position, value in zip(positions, values):
            args[position] = value
        result = table[node.target](*args, **node.kwargs)
        # a plain tuple: make_fx would trace a namedtuple's constructor as a node
        return tuple(result) if isinstance(result, tuple) else result

    with mode if mode is not None else contextlib.nullcontext():
        sub = make_fx(call, decomposition_table=table)(*[_value(t) for t in tensors])
    env: dict[fx.Node, fx.Node] = {}
    placeholders = iter(tensors)
    with graph.inserting_before(node):
        for inner in sub.graph.nodes:
            if inner.op == "placeholder":
                env[inner] = next(placeholders)
            elif inner.op == "output":
                result = inner.args[0]
            else:
                env[inner] = graph.node_copy(inner, lambda n: env[n])
                env[inner].meta = {**node.meta, "val": inner.meta.get("val")}
    _replace_results(node, result, env)
    graph.erase_node(node)


def _replace_results(node: fx.Node, result, env: dict) -> None:
    if isinstance(result, (tuple, list)):
        for user in list(node.users):
            user.replace_all_uses_with(env[result[user.args[1]]])
            user.graph.erase_node(user)
    else:
        node.replace_all_uses_with(env[result])


def restore(gm: fx.GraphModule, ctx) -> PassResult:
    """Decompose every HELD op left in ``gm`` (the fused pattern's leftovers)."""
    graph = gm.graph
    held = [n for n in graph.nodes if n.op == "call_function" and n.target in HELD]
    if held:
        table = decomposition_table(full_table=True)
        mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes
                                 if n.op == "placeholder"])
        for node in held:
            _decompose(graph, node, table, mode)
        gm.recompile()
    return PassResult(gm, {"decomposed": len(held)})
