"""One gradient for a parameter that enters the graph twice (tied weights).

What it does: a language model's output projection tied to its embedding
(``lm_head.weight = wte.weight``: GPT-2, BERT, T5 and most transformers
models by default) is one tensor under two parameter names. The standalone
face lifts parameters by name (``named_parameters(remove_duplicate=False)``,
as ``aot_module_simplified`` does), so the joint graph has two primals for
it and returns a gradient for each; the autograd engine then adds the two
outside the compiled program. At the end of the backward three ``V x width``
tensors are alive at once -- the two returned gradients and their sum --
which set the step's peak on a logits-heavy model (measured: +0.5 MiB of
1.7 MiB on benchmarks/lm_loss_memory.py's GPT-2). dynamo deduplicates such
inputs itself, so the torch.compile face never sees this.

This pass adds the gradients of the primals that are one tensor
(``PassContext.tied_primals``, positions found by identity on the real
inputs) inside the graph and returns the sum at the first position and
``None`` at the others: autograd gives a ``None`` gradient nothing, so the
tensor accumulates the sum once. Inside the graph the sum is an ordinary
node: cleanup folds an embedding's scatter-add into it
(``scatter_into_sums``) and the memory plan sees it.

Requires: the joint graph; its outputs are the forward's
  ``num_fwd_outputs`` values, then one gradient (or None) per primal, in
  primal order.
Ensures: for each group of tied primals, the first returns the sum of the
  group's gradients, the others None; nothing else changes.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from retrograd.ir import PassResult

__all__ = ["run", "expected_values"]

aten = torch.ops.aten


def _summed(graph: fx.Graph, grads: list[fx.Node], output: fx.Node) -> fx.Node:
    """``grads[0] + grads[1] + ...`` as nodes before the output."""
    total = grads[0]
    with graph.inserting_before(output):
        for grad in grads[1:]:
            value = total.meta.get("val")
            total = graph.call_function(aten.add.Tensor, (total, grad))
            if value is not None:
                total.meta["val"] = value + grad.meta["val"]
    return total


def _groups(ctx, count: int):
    """Each tied group's output positions (in range), first one first."""
    first = ctx.num_fwd_outputs or 0
    for group in getattr(ctx, "tied_primals", ()):
        yield [first + p for p in group if first + p < count]


def expected_values(values: list, ctx) -> list:
    """What the joint graph returns after this pass, given what it returned
    before (verify compares against it): the same sums, on real tensors."""
    values = list(values)
    for positions in _groups(ctx, len(values)):
        grads = [values[p] for p in positions if isinstance(values[p], torch.Tensor)]
        if len(grads) < 2:
            continue
        values[positions[0]] = sum(grads[1:], grads[0])
        for position in positions[1:]:
            values[position] = None
    return values


def run(gm: fx.GraphModule, ctx) -> PassResult:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    values = list(output.args[0])
    merged, bytes_not_returned = 0, 0
    for positions in _groups(ctx, len(values)):
        grads = [values[p] for p in positions if isinstance(values[p], fx.Node)]
        if len(grads) < 2:
            continue
        values[positions[0]] = _summed(gm.graph, grads, output)
        for position in positions[1:]:
            values[position] = None
        merged += len(grads) - 1
        value = grads[0].meta.get("val")
        if isinstance(value, torch.Tensor):
            bytes_not_returned += (len(grads) - 1) * value.numel() * value.element_size()
    if merged:
        output.args = (type(output.args[0])(values), *output.args[1:])
        gm.recompile()
    return PassResult(gm, {"gradients_merged": merged,
                           "gradient_bytes_not_returned": bytes_not_returned})
