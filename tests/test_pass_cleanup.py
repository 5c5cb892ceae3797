"""The cleanup pass on small graphs: dead nodes, common subexpressions, no-op
views, transposed products, gathers pushed to the logits. Graphs come from
``make_fx`` of tiny functions in fake mode; a rewritten graph is also run on
real inputs and compared with the original."""

from __future__ import annotations

import torch
import torch.fx as fx

from retrograd.passes import cleanup
from pass_helpers import aten, context, run_gm, targets, trace
from pass_helpers import seeded  # noqa: F401  (autouse: each test from seed 0)


def test_cleanup_removes_dead_nodes():
    def fn(x):
        unused = torch.sin(x) * 3          # noqa: F841  dead: two nodes
        return torch.exp(x)
    gm = trace(fn, torch.randn(3, 4))
    assert aten.sin.default in targets(gm)
    stats = cleanup.run(gm, context()).stats
    assert targets(gm) == [aten.exp.default]
    assert stats["dead_nodes_removed"] == 2
    x = torch.randn(3, 4)
    torch.testing.assert_close(run_gm(gm, [x])[0], x.exp())


def _hand_built_graph() -> fx.GraphModule:
    """x, w -> (permute(mm(x, w)), exp(x)), plus three dead nodes: sin(x) * 3
    (a chain of two) and cos(w). The product is rewritten transposed (three
    nodes in, two out), which is not dead code."""
    graph = fx.Graph()
    x, w = graph.placeholder("x"), graph.placeholder("w")
    values = {x: torch.randn(4, 4), w: torch.randn(4, 4)}

    def call(target, *args):
        node = graph.call_function(target, args)
        values[node] = target(*[values.get(a, a) if isinstance(a, fx.Node) else a
                                for a in args])
        return node
    call(aten.mul.Tensor, call(aten.sin.default, x), 3)
    call(aten.cos.default, w)
    product = call(aten.permute.default, call(aten.mm.default, x, w), [1, 0])
    graph.output((product, call(aten.exp.default, x)))
    for node, value in values.items():
        node.meta["val"] = value
    return fx.GraphModule(torch.nn.Module(), graph)


def test_cleanup_counts_the_dead_nodes_of_a_hand_built_graph():
    gm = _hand_built_graph()
    stats = cleanup.run(gm, context()).stats
    assert stats["dead_nodes_removed"] == 3 and stats["matmuls_transposed"] == 1
    assert aten.sin.default not in targets(gm) and aten.cos.default not in targets(gm)
    x, w = torch.randn(4, 4), torch.randn(4, 4)
    torch.testing.assert_close(run_gm(gm, [x, w]), [(x @ w).t(), x.exp()])


def test_cleanup_counts_dead_nodes_rather_than_deriving_them(monkeypatch):
    """The count is what dead-code elimination took out, not the node total
    less what each rewrite is assumed to add: a rewrite that leaves one more
    unread node behind makes one more dead node (the old arithmetic said 3)."""
    real = cleanup.transpose_matmuls

    def leaves_one_behind(graph: fx.Graph) -> int:
        rewritten = real(graph)
        x = next(node for node in graph.nodes if node.op == "placeholder")
        with graph.inserting_after(x):
            graph.call_function(aten.neg.default, (x,))
        return rewritten
    monkeypatch.setattr(cleanup, "transpose_matmuls", leaves_one_behind)
    assert cleanup.run(_hand_built_graph(), context()).stats["dead_nodes_removed"] == 4


def test_cleanup_merges_duplicate_pure_ops():
    def fn(x, y):
        return torch.exp(x) * torch.exp(x) + torch.add(x, y) - torch.add(x, y)
    x, y = torch.randn(3, 4), torch.randn(4)
    gm = trace(fn, x, y)
    assert targets(gm).count(aten.exp.default) == 2
    stats = cleanup.run(gm, context()).stats
    assert targets(gm).count(aten.exp.default) == 1
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    adds_of_inputs = [n for n in gm.graph.nodes if n.target == aten.add.Tensor
                      and list(n.args) == placeholders]
    assert len(adds_of_inputs) == 1
    assert stats["common_subexpressions_merged"] == 2
    [mul] = [n for n in gm.graph.nodes if n.target == aten.mul.Tensor]
    assert mul.args[0] is mul.args[1]
    torch.testing.assert_close(run_gm(gm, [x, y])[0], fn(x, y))


def test_cleanup_keeps_ops_that_differ_in_arguments():
    def fn(x):
        return (x + 1, x + 2, torch.sum(x, [0]), torch.sum(x, [1]), x * 0.0, x * -0.0)
    gm = trace(fn, torch.randn(3, 3))
    before = len(targets(gm))
    stats = cleanup.run(gm, context()).stats
    assert len(targets(gm)) == before
    assert stats["common_subexpressions_merged"] == 0


def test_cleanup_does_not_merge_int_and_float_scalars():
    """1 == 1.0 in Python, but x + 1 stays int64 where x + 1.0 becomes float32."""
    def fn(x):
        return x + 1, x + 1.0, x + True, x + 1
    gm = trace(fn, torch.randint(0, 5, (3,)))
    stats = cleanup.run(gm, context()).stats
    assert stats["common_subexpressions_merged"] == 1     # only the second x + 1
    x = torch.randint(0, 5, (3,))
    got = run_gm(gm, [x])
    for a, b in zip(got, fn(x)):
        assert a.dtype == b.dtype
        assert torch.equal(a, b)


def test_cleanup_merges_nan_literals():
    def fn(x):
        return torch.add(x, float("nan")) + torch.add(x, float("nan"))
    gm = trace(fn, torch.randn(3))
    assert cleanup.run(gm, context()).stats["common_subexpressions_merged"] == 1


def test_cleanup_never_merges_random_ops():
    def fn(x):
        a = torch.rand(3, 4) + x
        b = torch.rand(3, 4) + x
        c = aten.native_dropout(x, 0.5, True)[0]
        d = aten.native_dropout(x, 0.5, True)[0]
        return a, b, c, d
    gm = trace(fn, torch.randn(3, 4))
    cleanup.run(gm, context())
    assert targets(gm).count(aten.rand.default) == 2
    assert targets(gm).count(aten.native_dropout.default) == 2
    # and the adds that read different random tensors stay two adds
    assert targets(gm).count(aten.add.Tensor) == 2
    a, b, c, d = run_gm(gm, [torch.ones(3, 4)])
    assert not torch.equal(a, b)
    assert not torch.equal(c, d)


def test_cleanup_removes_no_op_views_only():
    def fn(x):
        same = x.view(3, 4)                    # no-op
        reshaped = x.view(4, 3)                # not a no-op
        return torch.exp(same) + 1, torch.sin(reshaped)
    x = torch.randn(3, 4)
    gm = trace(fn, x)
    assert targets(gm).count(aten.view.default) == 2
    stats = cleanup.run(gm, context()).stats
    assert stats["no_op_views_removed"] == 1
    [view] = [n for n in gm.graph.nodes if n.target == aten.view.default]
    assert list(view.args[1]) == [4, 3]
    [exp] = [n for n in gm.graph.nodes if n.target == aten.exp.default]
    assert exp.args[0].op == "placeholder"
    for a, b in zip(run_gm(gm, [x]), fn(x)):
        torch.testing.assert_close(a, b)


def test_cleanup_keeps_a_view_that_is_an_output():
    gm = trace(lambda x: (x.view(3, 4), x.exp()), torch.randn(3, 4))
    stats = cleanup.run(gm, context()).stats
    assert stats["no_op_views_removed"] == 0
    assert aten.view.default in targets(gm)


def test_cleanup_then_view_removal_enables_cse():
    """exp(view(x)) and exp(x) are one value once the no-op view is gone."""
    gm = trace(lambda x: torch.exp(x.view(3, 4)) + torch.exp(x), torch.randn(3, 4))
    stats = cleanup.run(gm, context()).stats
    assert targets(gm) == [aten.exp.default, aten.add.Tensor]
    assert stats == {"dead_nodes_removed": 0, "common_subexpressions_merged": 1,
                     "no_op_views_removed": 1, "matmuls_transposed": 0,
                     "masked_results_dropped": 0, "gathers_pushed": 0,
                     "scatters_into_sums": 0}


def test_cleanup_removes_views_that_undo_each_other():
    gm = trace(lambda x: torch.exp(x.permute(1, 0).permute(1, 0)), torch.randn(3, 4))
    cleanup.run(gm, context())
    assert targets(gm) == [aten.exp.default]


def test_cleanup_writes_a_transposed_product_transposed():
    a, b = torch.randn(3, 5), torch.randn(5, 4)
    gm = trace(lambda a, b: (a @ b).permute(1, 0), a, b)
    stats = cleanup.run(gm, context()).stats
    assert stats["matmuls_transposed"] == 1
    [product] = [n for n in gm.graph.nodes if n.target is aten.mm.default]
    assert product.meta["val"].shape == (4, 3) and product.meta["val"].is_contiguous()
    torch.testing.assert_close(gm(a, b)[0], (a @ b).t())


def test_cleanup_gathers_the_logits_not_the_log_softmax():
    """Cross-entropy's gather moves through log-softmax's pointwise ops (their
    other operands are row values): it reads the logits, and the log-softmax
    is no longer needed in memory for it. Same values."""
    import torch.nn.functional as F
    logits, target = torch.randn(6, 10), torch.randint(0, 10, (6,))
    gm = trace(lambda x, t: F.cross_entropy(x, t, reduction="none"), logits, target,
               decompose=True)
    expected = run_gm(gm, [logits, target])
    stats = cleanup.run(gm, context()).stats
    assert stats["gathers_pushed"] == 2
    [gather] = [n for n in gm.graph.nodes if n.target is aten.gather.default]
    assert gather.args[0].op == "placeholder"
    torch.testing.assert_close(run_gm(gm, [logits, target]), expected)


def test_cleanup_keeps_a_gather_whose_source_varies_along_the_dimension():
    x, y, index = torch.randn(4, 5), torch.randn(4, 5), torch.randint(0, 5, (4, 2))
    gm = trace(lambda x, y, i: torch.gather(x * y, 1, i), x, y, index)
    expected = run_gm(gm, [x, y, index])
    assert cleanup.run(gm, context()).stats["gathers_pushed"] == 0
    torch.testing.assert_close(run_gm(gm, [x, y, index]), expected)
    # a row operand, but the index is narrower along another dimension: kept too
    gm = trace(lambda x, r, i: torch.gather(x - r, 1, i), x, torch.randn(4, 1),
               torch.randint(0, 5, (3, 2)))
    assert cleanup.run(gm, context()).stats["gathers_pushed"] == 0


def test_cleanup_scatters_an_embedding_gradient_into_the_other_gradient():
    """``x + index_put(zeros, [i], v, accumulate=True)`` (a tied embedding's two
    gradients) becomes ``index_put(x, [i], v, True)``: the zeroed buffer and
    the add are gone, the sum is the same (repeated indices accumulate)."""
    x, v = torch.randn(7, 3), torch.randn(5, 3)
    i = torch.tensor([0, 3, 3, 6, 0])

    def summed(x, i, v):
        return x + torch.zeros(7, 3).index_put((i,), v, accumulate=True)
    gm = trace(summed, x, i, v)
    assert aten.add.Tensor in targets(gm)
    stats = cleanup.run(gm, context()).stats
    assert stats["scatters_into_sums"] == 1
    assert aten.add.Tensor not in targets(gm) and aten.full.default not in targets(gm)
    [scatter] = [n for n in gm.graph.nodes if n.target is aten.index_put.default]
    assert scatter.args[0].op == "placeholder"
    torch.testing.assert_close(gm(x, i, v)[0], summed(x, i, v))


def test_cleanup_leaves_a_broadcast_or_overwriting_scatter_alone():
    """A sum that broadcasts ``x`` or the scatter, or a scatter that
    overwrites (no accumulate), is not a scatter-add into ``x``."""
    i, v = torch.tensor([0, 2]), torch.randn(2, 3)
    broadcast = trace(lambda r, i, v: r + torch.zeros(4, 3).index_put((i,), v, accumulate=True),
                      torch.randn(3), i, v)
    small = trace(lambda x, i, v: x + torch.zeros(3).index_put((i,), v[:, 0], accumulate=True),
                  torch.randn(4, 3), i, v)
    overwrite = trace(lambda x, i, v: x + torch.zeros(4, 3).index_put((i,), v),
                      torch.randn(4, 3), i, v)
    for gm in (broadcast, small, overwrite):
        assert cleanup.run(gm, context()).stats["scatters_into_sums"] == 0
