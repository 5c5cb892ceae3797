"""Fuse the last matmul and the cross-entropy: the logits are never held.

What it does, on the joint graph (a compile_step graph, or a forward
compiled without gradients, where only the forward half is fused): finds

    mm / addmm(hidden, weight^T [, bias])      # the output projection
      -> views, row slices, clones, casts       # 3-d view, causal shift, flatten, upcast
         [and once: c * tanh(x / c)]             # Gemma 2's final soft cap
      -> _log_softmax(dim=-1) -> nll_loss_forward([class weights])
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

A z-loss's ``logsumexp(logits, -1)`` of the same logits (PaLM, OLMo) is
taken from the fused op's logsumexp, and its gradient ``g_z * softmax``
joins the fused backward (passes/matching/z_loss.py).

Left alone, with the reason in the stats: logits or log-probabilities read
elsewhere (returned, a logsumexp but that z-loss's, any reduction of the
log-probabilities but the row sum), a softmax not over the last dim, a reshape that mixes the
vocabulary dim, a logits gradient read by anything but the three products,
a soft cap whose gradient is not autograd's mul / tanh-derivative / div;
and, in a training graph, logits too small to pay: where the logits and
their gradient (``2 x rows x V`` elements) take no more bytes than the
float32 ``V x width`` weight gradient the fused backward accumulates, the
fusion cannot lower the peak -- that gradient is an extern op's result,
outside the arena, where the unfused product's result is planned into it --
and measured, it raised it (a GPT-2 of width 32 and 64 words on 14 rows:
94,056 -> 96,096 bytes, compile_step; 256 words: 97,920 -> 106,080).

Chunk size: ``chunk_rows = min(CHUNK_BYTES * (memory_budget or 1) // (V * 4),
ceil(rows / MIN_CHUNKS))``, at least 1: a chunk's float32 logits take at most
4 MiB (less under a tighter budget) and at most an eighth of all the logits,
so the transient chunk stays small beside what the fusion saves.

Which kernels: the chunked extern matmuls above, or Cut Cross-Entropy's
Triton kernels (codegen/cce.py, compiler/cce_ops.py: a matmul with a fused
online-logsumexp epilogue, the logits tile never written to memory, and its
backward), same arguments, same values. ``ctx.op_support.choose_cce``
decides: CCE with ``matmul_templates=True`` (tests run it under the
interpreter), the chunked ops with False or off CUDA, and on CUDA by default
the faster of the two in a bounded, cached autotune; the record is in the
stats (``kernels``).

The pattern itself is found by passes/matching/cross_entropy.py.

Requires: a joint, step or inference graph traced with decompositions.HELD
  ops whole.
Ensures: each matched pattern's loss and gradients computed by the two fused
  ops; no node of size rows x V left from it; every other node unchanged.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from retrograd.ir import PassResult
from retrograd.passes.matching.cross_entropy import (
    ROW_VIEWS, Match, match_backward, match_forward, shape, slice_arguments, too_small)
from retrograd.passes.op_classes import is_pure

__all__ = ["run", "CHUNK_BYTES"]

aten = torch.ops.aten

#: The most bytes of float32 logits one chunk holds (scaled by memory_budget).
CHUNK_BYTES = 4 << 20
#: The fewest chunks the rows are cut into (where they have that many rows).
MIN_CHUNKS = 8
#: The fused op pairs, by kernel: chunked extern matmuls (compiler/loss_ops.py)
#: or Cut Cross-Entropy's Triton kernels (compiler/cce_ops.py); looked up late,
#: as the compiler registers them.
OPS = {"chunked": (lambda: torch.ops.retrograd.linear_cross_entropy.default,
                   lambda: torch.ops.retrograd.linear_cross_entropy_backward.default),
       "cce": (lambda: torch.ops.retrograd.linear_cross_entropy_cce.default,
               lambda: torch.ops.retrograd.linear_cross_entropy_cce_backward.default)}


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
        width = shape(hidden)[-1]
        if op.target in ROW_VIEWS:
            before = list(shape(hidden))
            hidden = build.add(aten.view.default, [hidden, [*shape(op)[:-1], width]])
            undo.append((aten.view.default, before))
        elif op.target is aten.slice.Tensor:
            before, where = list(shape(hidden)), slice_arguments(op)
            hidden = build.add(aten.slice.Tensor, [hidden, *where])
            undo.append((aten.slice_scatter.default, before, where))
        elif op.target is aten.clone.default:
            hidden = build.add(aten.clone.default, [hidden],
                               {"memory_format": torch.contiguous_format})
    return hidden, undo


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


def _rewrite(graph: fx.Graph, match: Match, mode, chunk_rows: int, ops=OPS["chunked"]) -> None:
    """The forward half becomes one fused call; then the backward half, if any
    (``ops``: the forward and backward op pair, chunked or CCE)."""
    build = _Builder(graph, mode)
    matmul, nll = match.matmul, match.nll
    bias = matmul.args[0] if matmul.target is aten.addmm.default else None
    common = [nll.args[1], nll.args[2], nll.args[3], nll.args[4],
              match.log_softmax.meta["val"].dtype, chunk_rows, match.cap[0] if match.cap else 0.0]
    # target, class weights, reduction, ignore_index, logits dtype, chunk rows, soft cap
    with graph.inserting_before(nll):
        weight = _weight_rows(build, matmul)
        rows, undo = _replay_rows(build, match, matmul.args[-2])
        fused = build.add(ops[0](), [rows, weight, bias, *common])
        loss, lse, row_sums = (build.add(operator.getitem, [fused, i]) for i in range(3))
        for node in match.row_sums:
            node.replace_all_uses_with(build.add(aten.view.default,
                                                 [row_sums, list(shape(node))]))
        if match.z is not None:
            _replace_z(build, match.z, lse)
    match.loss.replace_all_uses_with(loss)
    if match.nll_backward is not None:
        _rewrite_backward(build, match, [rows, weight, bias, *common[:2], lse], common[2:], undo,
                          ops[1]())


def _replace_z(build: _Builder, z: fx.Node, lse: fx.Node) -> None:
    """The z-loss's logsumexp becomes the fused op's (cast to the logits'
    dtype, shaped like ``z``). Its readers placed before the fused op move
    to just after the replacement, with what reads them there, in order."""
    dtype = z.meta["val"].dtype
    if dtype != lse.meta["val"].dtype:
        lse = build.add(aten._to_copy.default, [lse], {"dtype": dtype})
    value = build.add(aten.view.default, [lse, list(shape(z))])
    order = {node: i for i, node in enumerate(build.graph.nodes)}
    early, frontier = set(), list(z.users)
    while frontier:
        node = frontier.pop()
        if node not in early and order[node] < order[value]:
            early.add(node)
            frontier.extend(node.users)
    anchor = value
    for node in sorted(early, key=order.__getitem__):
        anchor.append(node)
        anchor = node
    z.replace_all_uses_with(value)


def _rewrite_backward(build: _Builder, match: Match, tensors: list, scalars: list,
                      undo: list, op) -> None:
    """The backward half: one fused call, its results in place of the products'."""
    rows_count = shape(match.log_softmax)[0]
    # after the z-loss's gradient too: autograd may write it after the log-softmax's
    anchor = match.log_softmax_backward
    if match.z_grad is not None and _later(match.z_grad, anchor):
        anchor = match.z_grad.next
    with build.graph.inserting_before(anchor):
        row_grad = match.row_grad and build.add(aten.view.default,
                                                [match.row_grad, [rows_count]])
        z_grad = match.z_grad and build.add(aten.view.default, [match.z_grad, [rows_count]])
        grads = build.add(op, [match.nll_backward.args[0], *tensors, row_grad, *scalars,
                           bool(match.grad_weight or match.grad_weight_t),
                           bool(match.grad_bias), *([z_grad] if z_grad else [])])
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
                                                 [grad_bias, list(shape(node))]))


def _later(node: fx.Node, other: fx.Node) -> bool:
    """Whether ``node`` comes after ``other`` in its graph's order."""
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return order[node] > order[other]


def _erase_dead(graph: fx.Graph) -> None:
    """Remove the nodes the rewrite left unread (pure ops only)."""
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and not node.users and is_pure(node):
            graph.erase_node(node)


def run(gm: fx.GraphModule, ctx) -> PassResult:
    graph = gm.graph
    budget = getattr(ctx.options, "memory_budget", None) or 1.0
    fused, avoided, chunks, left, kernels = 0, 0, [], [], []
    mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes if n.op == "placeholder"])
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten._log_softmax.default:
            continue
        match = match_forward(node)
        reason = match if isinstance(match, str) else (match_backward(match)
                                                         or too_small(match))
        if reason is not None:
            left.append(f"{node.name}: {reason}")
            continue
        rows, vocab = shape(node)
        chunk_rows = max(1, min(int(CHUNK_BYTES * budget) // (vocab * 4),
                                -(-rows // MIN_CHUNKS)))
        kernel, record = _choose_kernel(ctx, match, chunk_rows)
        _rewrite(graph, match, mode, chunk_rows, OPS[kernel])
        kernels.append({"node": node.name, **record})
        fused += 1
        chunks.append(chunk_rows)
        held = 2 if match.nll_backward is not None else 1   # the logits and their gradient
        avoided += held * rows * vocab * node.meta["val"].element_size()
    if fused:
        _erase_dead(graph)
        gm.recompile()
    return PassResult(gm, {"fused": fused, "chunk_rows": chunks, "kernels": kernels,
                           "logits_bytes_not_held": avoided, "left_alone": left})


def _choose_kernel(ctx, match: Match, chunk_rows: int) -> tuple[str, dict]:
    """"chunked" or "cce", with the record of why (``ctx.op_support.choose_cce``:
    compiler/cce_ops.py; the chunked ops where no choice is offered)."""
    choose = getattr(ctx.op_support, "choose_cce", None)
    if choose is None:
        return "chunked", {"kernel": "chunked", "why": "no choice offered"}
    hidden, weight = match.matmul.args[-2].meta["val"], match.matmul.args[-1].meta["val"]
    use, record = choose(ctx.options, shape(match.log_softmax)[0], weight.shape[-1],
                         hidden.shape[-1], hidden.dtype, match.log_softmax.meta["val"].dtype,
                         match.matmul.target is aten.addmm.default, hidden.device, chunk_rows)
    return ("cce" if use else "chunked"), record
