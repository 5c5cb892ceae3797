"""``ledger.predicted_peak``: a view counts as its base's storage, and a dying
operand's storage is taken by the op that reads it last, as the program does.

A view (an op whose schema says its result aliases its input: ``t``,
``permute``, ``expand``, ``split``...) shares its base's storage, so it costs
nothing, and its base stays alive until the view's last reader. The
prediction used to count a recomputed view (GPT-2's ``view_11``,
``permute_26``) and a backward view (``expand`` of the tangent) as values of
their own: the peak guard then compared wrong numbers (BENCHMARKS.md, Pareto
section). And the torch program writes a pointwise result into any operand
of its layout that dies there (``codegen/torch_liveness.py``: GPT-2's GELU
backward, ``torch.mul(view_55, mul_4, out=mul_4)``), which the prediction
allowed only for the first argument, not through a view. The graphs below
are built by hand so that the right figures can be counted by hand.
"""

from __future__ import annotations

import torch
from retrograd.passes.planning import ledger, remat
from torch import fx

aten = torch.ops.aten

#: bytes of one [8, 32] float32 value
VALUE = 8 * 32 * 4


def _module(build) -> tuple[fx.GraphModule, dict[str, fx.Node]]:
    """A joint graph from ``build(graph, call, x, tangent)`` (returns the
    output tuple), each node's ``val`` computed on real tensors."""
    graph = fx.Graph()

    def call(name, target, *args):
        return graph.create_node("call_function", target, args, name=name)
    x, tangent = graph.placeholder("primals_1"), graph.placeholder("tangents_1")
    graph.output(build(call, x, tangent))
    values = {"primals_1": torch.randn(8, 32), "tangents_1": torch.tensor(1.0)}
    for node in graph.nodes:
        if node.op == "call_function":
            args = [values[a.name] if isinstance(a, fx.Node) else a for a in node.args]
            values[node.name] = node.target(*args)
        if node.op != "output":
            node.meta["val"] = values[node.name]
    module = fx.GraphModule(torch.nn.Module(), graph)
    return module, {node.name: node for node in module.graph.nodes}


def _views(call, x, tangent):
    """forward: relu(x) -> sin -> sum (the loss); backward: ``t(relu)`` (a
    forward view the backward reads) times the tangent expanded to [8, 8]
    (256 bytes), the product's transpose (a backward view) times it again.
    Matrix products: no result here takes an operand's storage."""
    relu = call("relu", aten.relu.default, x)
    loss = call("loss", aten.sum.default, call("sin", aten.sin.default, relu))
    view = call("t", aten.t.default, relu)
    expand = call("expand", aten.expand.default, tangent, [8, 8])
    product = call("mm", aten.mm.default, view, expand)
    back = call("back", aten.t.default, product)
    return loss, call("grad", aten.mm.default, expand, back)


def _peak(build, saved: list[str], recomputed: list[str]) -> int:
    module, nodes = _module(build)
    info = remat.analyse(module, 1)
    return ledger.predicted_peak(module.graph, info, {nodes[n] for n in saved},
                                 {nodes[n] for n in recomputed})


def test_a_recomputed_view_of_a_recomputed_base_costs_nothing():
    """Both recomputed before ``mm``: the recomputed relu lives until ``mm``
    (its view's reader), beside ``mm``'s result and the 4-byte loss (a
    forward output, alive to the end); then ``mm`` (through its view) beside
    the gradient. The tangent's expand costs nothing. By hand: 2 values + 4
    bytes (before the change: 2 values + 256 + 4, the view or the transpose
    and the expand counted apart)."""
    assert _peak(_views, [], ["relu", "t"]) == 2 * VALUE + 4


def test_a_recomputed_view_of_a_saved_base_keeps_the_base_to_the_views_reader():
    """relu saved, its view recomputed: relu lives until ``mm`` reads the
    view (not only until the view is made), and the view adds no bytes. By
    hand: relu, ``mm``'s result and the loss at ``mm``, 2 values + 4 (the
    forward's relu + sin, 2 values, is no higher)."""
    assert _peak(_views, ["relu"], ["t"]) == 2 * VALUE + 4


def test_a_base_whose_view_is_read_late_is_alive_until_then():
    """The view's readers extend the base's life where the base alone would
    die first: ``mm``'s transpose is read by the last op, so ``mm`` lives
    beside the gradient (before: the transpose's own bytes and the expand's)."""
    module, nodes = _module(_views)
    info = remat.analyse(module, 1)
    lives = list(ledger._lives(module.graph, info, {nodes["relu"]}, {nodes["t"]}))
    at_grad = (list(module.graph.nodes).index(nodes["grad"]), ledger._AFTER)
    alive = sum(size for size, first, last in lives if first <= at_grad <= last)
    assert alive == 2 * VALUE + 4     # mm's result (through its view), the gradient, the loss


def _in_place(call, x, tangent):
    """forward: exp(x) -> sum; backward: the tangent expanded to [8, 32],
    ``a = cos(expand)`` (a backward value), then
    ``mul(x, view(a))``: pointwise, its second operand's storage (``a``,
    through a view) dies there and has its layout."""
    loss = call("loss", aten.sum.default, call("exp", aten.exp.default, x))
    expand = call("expand", aten.expand.default, tangent, [8, 32])
    grad_a = call("a", aten.cos.default, expand)
    alias = call("alias", aten.view.default, grad_a, [8, 32])
    return loss, call("grad", aten.mul.Tensor, x, alias)


def test_a_pointwise_result_takes_a_dying_operands_storage_through_a_view():
    """``grad`` writes into ``a``'s storage (the program's ``torch.mul(x,
    alias, out=alias)``): one value at a time in the backward. By hand: the
    forward's exp and the loss, or ``a``/``grad`` and the loss: 1 value + 4
    (before: 2 values + 4 at ``grad``, only a first argument was taken)."""
    assert _peak(_in_place, [], []) == VALUE + 4
