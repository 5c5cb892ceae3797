"""Tied weights on the standalone face (passes/tied_gradients.py): a
parameter that is one tensor under two names (``head.weight =
embed.weight``, transformers' default tying) gets one gradient from the
compiled backward, summed inside the graph, not two that the autograd
engine adds after it, and the embedding's scatter-add writes it over the
fused loss's weight gradient (passes/planning/scatter_in_place.py);
gradients equal eager's, verify included."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

import retrograd
from retrograd.passes import tied_gradients
from checks import assert_close_floor
from pass_helpers import aten, context


class TiedByName(torch.nn.Module):
    """An embedding and an output projection sharing one Parameter under two
    names, as transformers ties ``lm_head.weight`` to the input embedding."""

    def __init__(self, vocab=40, width=6):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.mix = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        logits = self.head(torch.tanh(self.mix(self.embed(ids))))
        return F.cross_entropy(logits.flatten(0, 1), ids.flatten())


def _gradients_returned_for(loss: torch.Tensor, tensor: torch.Tensor) -> list:
    """Run the backward; the gradients the compiled function returned on its
    edges to ``tensor``'s AccumulateGrad (None where it returned none): more
    than one tensor means the engine adds them outside the program."""
    edges = [i for i, (fn, _) in enumerate(loss.grad_fn.next_functions)
             if type(fn).__name__ == "AccumulateGrad" and fn.variable is tensor]
    returned = []
    loss.grad_fn.register_hook(lambda grads, _: returned.extend(grads[i] for i in edges))
    loss.backward()
    return returned


@pytest.mark.parametrize("verify", [False, True])
def test_a_weight_tied_by_name_gets_one_summed_gradient(verify):
    torch.manual_seed(3)
    model, ids = TiedByName(), torch.randint(0, 40, (2, 9))
    twin = TiedByName()
    twin.load_state_dict(model.state_dict())
    twin(ids).backward()
    compiled = retrograd.compile(model, executor="interpret", verify=verify)
    returned = _gradients_returned_for(compiled(ids), model.embed.weight)
    assert len(returned) == 2 and sum(g is not None for g in returned) == 1, returned
    for (name, got), want in zip(model.named_parameters(), twin.parameters()):
        assert_close_floor(got.grad, want.grad, 1e-5, what=name)
    stats = next(p["stats"] for p in compiled.reports["forward"]["passes"]
                 if p["name"] == "tied_gradients")
    assert stats == {"gradients_merged": 1, "gradient_bytes_not_returned": 40 * 6 * 4}
    # the fused loss's grad_W (an extern result) dies in the embedding's
    # scatter-add, which writes the returned gradient over it
    plan = next(p["stats"] for p in compiled.reports["backward"]["passes"]
                if p["name"] == "buffer_reuse")
    assert plan["scatters_in_place"] == 1, plan


def test_the_pass_sums_each_group_and_returns_none_for_the_rest():
    """Hand-built joint-shaped graph: one forward output, then the gradients
    of four primals, where primals 0 and 2 are one tensor and 3 has none."""
    graph = fx.Graph()
    a, b, c = (graph.placeholder(n) for n in "abc")
    for node in (a, b, c):
        node.meta["val"] = torch.empty(3)
    loss = graph.call_function(aten.sum.default, (a,))
    grads = [graph.call_function(aten.mul.Tensor, (x, 2.0)) for x in (a, b, c)]
    graph.output((loss, grads[0], grads[1], grads[2], None))
    for node in [loss, *grads]:
        node.meta["val"] = torch.empty(()) if node is loss else torch.empty(3)
    gm = fx.GraphModule(torch.nn.Module(), graph)
    ctx = context()
    ctx.num_fwd_outputs, ctx.tied_primals = 1, ((0, 2),)
    inputs = [torch.randn(3) for _ in range(3)]
    before = list(gm(*inputs))
    stats = tied_gradients.run(gm, ctx).stats
    after = list(gm(*inputs))
    assert stats["gradients_merged"] == 1
    assert after[3] is None and after[4] is None
    torch.testing.assert_close(after[1], before[1] + before[3])
    torch.testing.assert_close(after[2], before[2])
    expected = tied_gradients.expected_values(before, ctx)
    torch.testing.assert_close(expected[1], after[1])
    assert expected[3] is None


def test_untied_and_torch_compile_graphs_are_left_alone():
    """Two Parameters with equal values are not one tensor; and dynamo hands
    the torch.compile face one input per tensor already."""
    torch.manual_seed(4)
    model, ids = TiedByName(), torch.randint(0, 40, (2, 9))
    model.head.weight = torch.nn.Parameter(model.embed.weight.detach().clone())
    compiled = retrograd.compile(model, executor="interpret")
    compiled(ids).backward()
    stats = next(p["stats"] for p in compiled.reports["forward"]["passes"]
                 if p["name"] == "tied_gradients")
    assert stats["gradients_merged"] == 0


def test_one_tensor_passed_twice_gets_the_whole_gradient():
    """``f(x, x)`` on the standalone face: the engine's gradient of x is the
    sum of both uses, through .backward() and torch.autograd.grad alike; and
    retrograd.grad, which reads each position itself, still gives each
    argument its own share."""
    def f(a, b):
        return (a.sin() * b).sum()
    x = torch.randn(5, requires_grad=True)
    want = torch.autograd.grad(f(x, x), x)[0]
    compiled = retrograd.compile(f, executor="interpret")
    got = torch.autograd.grad(compiled(x, x), x)[0]
    assert_close_floor(got, want, 1e-6, what="torch.autograd.grad")
    compiled(x, x).backward()
    assert_close_floor(x.grad, want, 1e-6, what=".grad")
    first, second = retrograd.grad(f, argnums=(0, 1), executor="interpret")(x, x)
    assert_close_floor(first, x.cos() * x, 1e-6, what="d/da")
    assert_close_floor(second, x.sin(), 1e-6, what="d/db")


def test_the_torch_program_scatters_in_place_too(tmp_path):
    """The CPU default (the torch program) follows the plan: the embedding's
    scatter-add runs as ``index_put_`` on the fused loss's grad_W, which dies
    there, instead of a functional index_put that copies it."""
    torch.manual_seed(5)
    model, ids = TiedByName(), torch.randint(0, 40, (2, 9))
    twin = TiedByName()
    twin.load_state_dict(model.state_dict())
    twin(ids).backward()
    compiled = retrograd.compile(model, executor="torch", dump_dir=str(tmp_path))
    compiled(ids).backward()
    for (name, got), want in zip(model.named_parameters(), twin.parameters()):
        assert_close_floor(got.grad, want.grad, 1e-5, what=name)
    program = next(tmp_path.glob("*-backward/program.py")).read_text()
    assert ".index_put_(" in program and "# in place" in program, program
