"""Automatic dynamic shapes (issue 14 item 4): after a dimension's second size,
one symbolic program serves every later size, on both faces; what still
compiles is logged and capped by ``recompile_limit`` (eager past it)."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import retrograd
import retrograd.backend
import torch
from checks import assert_close

pytestmark = pytest.mark.usefixtures("cache")


def function(x):
    return (x * 2).sin().sum()


def _check(compiled, reference_function, rows: int, columns: int = 4) -> None:
    """One call of ``compiled`` against eager in float64: value and gradient."""
    x = torch.randn(rows, columns, dtype=torch.float64, requires_grad=True)
    reference = x.detach().clone().requires_grad_()
    got = compiled(x)
    got.backward()
    expected = reference_function(reference)
    expected.backward()
    assert_close(got, expected, torch.float64)
    assert_close(x.grad, reference.grad, torch.float64, what="gradient")


def _programs(compiled) -> int:
    return sum(len(kept) for kept in compiled._cache.entries.values())


def test_standalone_ten_batch_sizes_compile_at_most_two_programs(caplog, cache):
    compiled = retrograd.compile(function, executor="interpret")
    with caplog.at_level(logging.INFO, logger="retrograd"):
        for rows in range(2, 12):
            _check(compiled, function, rows)
            if rows == 3:
                kernels = sorted(path.name for path in cache.glob("sized_pointwise_*"))
    assert compiled._cache.compiles == 2 and _programs(compiled) == 2
    symbolic = compiled.reports["forward"]["symbolic"]
    assert symbolic["dims"] == "input 0 dim 0" and symbolic["executor"] == "interpret"
    # x * 2 -> sin, and cos * 2 * grad: one size-generic kernel each, for every size;
    # the forward's .sum() (decomposed: a sum over dims []) a sized reduction
    assert [compiled.reports[half]["kernels"]["triton"] for half in ("forward", "backward")] \
        == [2, 1]
    assert len(kernels) == 2
    assert sorted(path.name for path in cache.glob("sized_pointwise_*")) == kernels
    assert "L['t0'].size()[0]" in symbolic["guards"]
    again = [r.getMessage() for r in caplog.records if "compiling function again" in
             r.getMessage()]
    assert again == [("retrograd.compile: compiling function again (compile 2): input 0 dim 0 "
                      "took another size: tracing with it symbolic")]
    _check(compiled, function, 2)   # the first size keeps its static program
    assert "symbolic" not in compiled.reports["forward"]
    assert compiled.reports["forward"]["kernels"]["triton"] >= 1


def test_dynamic_false_compiles_each_size_and_true_none_but_one():
    static = retrograd.compile(function, dynamic=False, executor="fx")
    always = retrograd.compile(function, dynamic=True)
    for rows in (2, 3, 4):
        _check(static, function, rows)
        _check(always, function, rows)
    assert static._cache.compiles == 3 and always._cache.compiles == 1
    assert always.reports["forward"]["symbolic"]["dims"] == "input 0 dim 0, input 0 dim 1"


class Attention(torch.nn.Module):
    """One head of self-attention over a sequence: (batch, sequence, 8)."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        weights = (q @ k.transpose(1, 2) / 8 ** 0.5).softmax(dim=-1)
        return (weights @ v).square().mean()


@pytest.mark.parametrize("face", ["standalone", "torch.compile"])
def test_symbolic_sequence_length_keeps_parameter_gradients_right(face, fresh_dynamo,
                                                                  monkeypatch):
    graphs = _record(monkeypatch)
    torch.manual_seed(0)
    model = Attention().double()
    reference = copy.deepcopy(model)
    compiled = (retrograd.compile(model) if face == "standalone"
                else torch.compile(model, backend="retrograd"))
    for length in (3, 5, 6, 9, 4):
        x = torch.randn(2, length, 8, dtype=torch.float64)
        model.zero_grad()
        reference.zero_grad()
        got, expected = compiled(x), reference(x)
        got.backward()
        expected.backward()
        assert_close(got, expected, torch.float64)
        for (name, a), b in zip(model.named_parameters(), reference.parameters()):
            assert_close(a.grad, b.grad, torch.float64, what=name)
    if face == "standalone":
        assert compiled._cache.compiles == 2
        assert compiled.reports["backward"]["symbolic"]["dims"] == "input 0 dim 1"
    else:
        assert _compiled_programs(graphs) == 2, graphs
        symbolic = [g for g in graphs if isinstance(g, retrograd.backend.SymbolicGraph)]
        assert "dim 1" in symbolic[0].reports["forward"]["symbolic"]["dims"]


def test_a_call_the_shape_guards_refuse_compiles_again():
    """Adding x and y, the symbolic trace learns ``s0 == s1`` (a guard): a y
    of one row, which broadcasts and needs its gradient summed, must not run
    that program."""
    def add(x, y):
        return (x + y).sin().sum()

    compiled = retrograd.compile(add)
    for rows, other in ((2, 2), (3, 3), (4, 4), (4, 1)):
        x = torch.randn(rows, 3, dtype=torch.float64, requires_grad=True)
        y = torch.randn(other, 3, dtype=torch.float64, requires_grad=True)
        got = compiled(x, y)
        got_grads = torch.autograd.grad(got, (x, y))
        expected = add(x, y)
        assert_close(got, expected, torch.float64)
        for a, b in zip(got_grads, torch.autograd.grad(expected, (x, y))):
            assert_close(a, b, torch.float64, what="gradient")
    guards = compiled._cache.entries
    assert compiled._cache.compiles == 3   # (2, 2); symbolic (3, 3) and (4, 4); symbolic (4, 1)
    # the (4, 1) call was traced symbolic in x with y's one row fixed (a size of
    # one is specialized): that program must refuse a y of 3 rows
    symbolic = [entry for kept in guards.values() for entry in kept if entry.shapes]
    assert len(symbolic) == 2
    assert not any(entry.shapes.hold([torch.ones(5, 3), torch.ones(3, 3)]) for entry in symbolic)
    assert [entry.shapes.hold([torch.ones(5, 3), torch.ones(1, 3)]) for entry in symbolic] \
        == [False, True]
    assert any(".size()[0] == L['t" in entry.compiler.reports["forward"]
               .get("symbolic", {}).get("guards", "") for kept in guards.values()
               for entry in kept), guards


def test_standalone_recompile_limit_runs_new_signatures_eagerly():
    compiled = retrograd.compile(function, dynamic=False, recompile_limit=2, executor="fx")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for rows in (2, 3, 4, 5, 2):
            _check(compiled, function, rows)
            if rows == 4:
                assert "eager_fallback" in compiled.reports["eager"]
    limit = [str(w.message) for w in caught if "recompile_limit" in str(w.message)]
    assert len(limit) == 1, limit
    assert "recompile_limit=2" in limit[0] and "input 0 shape (3, 4) -> (4, 4)" in limit[0]
    assert compiled._cache.compiles == 2 and _programs(compiled) == 2
    assert "forward" in compiled.reports   # size 2 still runs its program


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "3"])
def test_recompile_limit_must_be_a_positive_whole_number(bad):
    with pytest.raises(ValueError, match="recompile_limit"):
        retrograd.compile(function, recompile_limit=bad)


def test_dynamic_must_be_none_or_a_bool():
    with pytest.raises(ValueError, match="dynamic"):
        retrograd.compile(function, dynamic="auto")


def _record(monkeypatch) -> list:
    """Every graph object the torch.compile face makes (static or symbolic)."""
    made: list = []
    for cls in (retrograd.backend.CompiledGraph, retrograd.backend.SymbolicGraph):
        original = cls.__init__

        def init(self, *args, original=original, **kwargs):
            original(self, *args, **kwargs)
            made.append(self)
        monkeypatch.setattr(cls, "__init__", init)
    return made


def _compiled_programs(graphs: list) -> int:
    return sum(len(graph.compilers) if isinstance(graph, retrograd.backend.CompiledGraph)
               else 1 for graph in graphs)


def test_torch_compile_face_ten_batch_sizes_compile_at_most_two_programs(fresh_dynamo,
                                                                         monkeypatch):
    graphs = _record(monkeypatch)
    compiled = torch.compile(function, backend="retrograd")
    for rows in range(2, 12):
        _check(compiled, function, rows)
    assert _compiled_programs(graphs) == 2, graphs
    symbolic = [g for g in graphs if isinstance(g, retrograd.backend.SymbolicGraph)]
    assert len(symbolic) == 1
    assert "input 1 dim 0" in symbolic[0].reports["forward"]["symbolic"]["dims"]
    assert set(symbolic[0].reports) == {"forward", "backward"}


def test_torch_compile_face_recompile_limit_runs_eagerly(fresh_dynamo, monkeypatch, caplog):
    """With dynamic=False the symbolic graph dynamo hands over compiles per
    size; recompile_limit caps that, and the graph then runs in eager."""
    graphs = _record(monkeypatch)
    compiled = torch.compile(function, backend="retrograd",
                             options={"dynamic": False, "recompile_limit": 2,
                                      "executor": "fx"})
    with warnings.catch_warnings(record=True) as caught, \
            caplog.at_level(logging.INFO, logger="retrograd"):
        warnings.simplefilter("always")
        for rows in (2, 3, 4, 5, 6):
            _check(compiled, function, rows)
    assert not [g for g in graphs if isinstance(g, retrograd.backend.SymbolicGraph)]
    again = [r.getMessage() for r in caplog.records if "again" in r.getMessage()]
    assert any("input 1 shape (3, 4) -> (4, 4)" in line for line in again), again
    limit = [str(w.message) for w in caught if "recompile_limit" in str(w.message)]
    assert len(limit) == 1 and "input 1 shape (4, 4) -> (5, 4)" in limit[0], limit
    assert max(len(graph.compilers) for graph in graphs) == 2


def test_fx_executor_leaves_the_symbolic_program_to_torch_calls():
    compiled = retrograd.compile(function, executor="fx")
    for rows in (2, 3, 4):
        _check(compiled, function, rows)
    report = compiled.reports["forward"]
    assert report["kernels"]["triton"] == 0 and report["symbolic"]["executor"] == "fx"
    # as the static face writes it (capture.decompositions_for): .sum() is sum over dims []
    assert report["kernels"]["extern_ops"] == {"aten.mul.Tensor": 1, "aten.sin.default": 1,
                                               "aten.sum.dim_IntList": 1}


def test_a_broadcast_value_kernel_refuses_other_strides():
    """The kernel loads a value traced as broadcast (every stride 0) once; a
    tensor with other strides is refused, never read out of bounds."""
    from retrograd.symbolic_fusion import _as_loaded
    scalar = torch.tensor(2.0).expand(3, 4)
    assert _as_loaded(scalar, True, "k") is scalar
    with pytest.raises(RuntimeError, match="broadcast value"):
        _as_loaded(torch.ones(3, 4), True, "k")
    transposed = torch.ones(4, 3).t()
    assert _as_loaded(transposed, False, "k").is_contiguous()


def test_a_run_ending_in_a_mean_is_one_kernel_for_every_size():
    def mean_loss(x):
        return (x.exp() * 0.5).mean()

    compiled = retrograd.compile(mean_loss, executor="interpret")
    for rows in (2, 3, 17, 5):
        x = torch.randn(rows, 3, requires_grad=True)
        reference = x.detach().clone().requires_grad_()
        got = compiled(x)
        got.backward()
        expected = mean_loss(reference)
        expected.backward()
        assert_close(got, expected, torch.float32)
        assert_close(x.grad, reference.grad, torch.float32, what="gradient")
    forward = compiled.reports["forward"]["kernels"]
    assert forward["triton"] == 1 and forward["extern"] == 0, forward


def test_threads_with_different_sizes_share_one_symbolic_program():
    """Three threads, each its own sizes, on one compiled function: every value
    and gradient equals eager's, and the sizes compile two programs in all."""
    from test_threads import run_threads
    compiled = retrograd.compile(function, executor="interpret")

    def worker(first):
        def body():
            for rows in (first, first + 3):
                _check(compiled, function, rows)
            return True
        return body
    assert run_threads([worker(first) for first in (2, 3, 4)]) == [True] * 3
    assert compiled._cache.compiles == 2 and _programs(compiled) == 2


def test_an_infinite_constant_stays_a_torch_call():
    def clipped(x):
        return torch.minimum(x * float("inf"), x + 1.0).sin().sum()

    compiled = retrograd.compile(clipped, executor="interpret")
    for rows in (2, 3, 4):
        x = torch.randn(rows, 2, dtype=torch.float64)
        assert_close(compiled(x), clipped(x), torch.float64)
    assert compiled.reports["forward"]["kernels"]["extern_ops"]["aten.mul.Tensor"] == 1


def test_bias_gradients_and_per_row_means_are_size_generic_kernels():
    """Sums and means over leading dims (a bias gradient over every token) or
    trailing dims (per token), rows and columns counted at run time."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 5).double()
    reference = copy.deepcopy(linear)

    def loss(layer, x):
        y = layer(x)
        return (y.relu().sum(-1).square().mean(0).sum()
                + y.mean(dim=(1, 2), keepdim=True).sum() + x.sum(0).square().sum())

    compiled = retrograd.compile(lambda x: loss(linear, x), executor="interpret")
    for rows in (2, 3, 33, 4):
        x = torch.randn(rows, 3, 6, dtype=torch.float64, requires_grad=True)
        x_reference = x.detach().clone().requires_grad_()
        linear.zero_grad()
        reference.zero_grad()
        got, expected = compiled(x), loss(reference, x_reference)
        got.backward()
        expected.backward()
        assert_close(got, expected, torch.float64)
        assert_close(x.grad, x_reference.grad, torch.float64, what="input gradient")
        for a, b in zip(linear.parameters(), reference.parameters()):
            assert_close(a.grad, b.grad, torch.float64, what="parameter gradient")
    for half in ("forward", "backward"):
        extern = compiled.reports[half]["kernels"]["extern_ops"]
        assert "aten.sum.dim_IntList" not in extern and "aten.mean.dim" not in extern, extern


def test_symbolic_graph_is_decomposed_as_the_static_one():
    """The symbolic trace asks capture.decompositions_for as the static one does:
    layer norm, GELU and softmax reach the interpreter's symbolic program as
    reductions and pointwise math its size-generic kernels fuse (before, no
    table was passed: each stayed one whole torch call and the forward had no
    kernel at all); gradients as eager's at sizes never traced."""
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8),
                                torch.nn.GELU(), torch.nn.Softmax(-1)).double()
    reference = copy.deepcopy(block)
    compiled = retrograd.compile(block, executor="interpret")
    for rows in (4, 3, 5):
        x = torch.randn(rows, 8, dtype=torch.float64)
        block.zero_grad()
        reference.zero_grad()
        got, expected = compiled(x).square().sum(), reference(x).square().sum()
        got.backward()
        expected.backward()
        assert_close(got, expected, torch.float64)
        for (name, a), b in zip(block.named_parameters(), reference.parameters()):
            assert_close(a.grad, b.grad, torch.float64, what=name)
    whole = {"aten.native_layer_norm.default", "aten.gelu.default", "aten._softmax.default",
             "aten.native_layer_norm_backward.default", "aten.gelu_backward.default",
             "aten._softmax_backward_data.default"}
    for half in ("forward", "backward"):
        report = compiled.reports[half]
        assert "symbolic" in report and report["kernels"]["triton"] >= 2, report["kernels"]
        assert not whole & set(report["kernels"]["extern_ops"]), report["kernels"]
