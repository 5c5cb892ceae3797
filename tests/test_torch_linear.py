"""Transposes in the torch program (codegen/torch_linear.py): a linear layer's
``permute`` + ``addmm``/``mm`` written as ``F.linear``, a chain of permutes as
one; the same numbers bit for bit as the unfolded program, and eager's."""

from __future__ import annotations

import pytest
import torch
from pass_helpers import (
    fuse,
    seeded,  # noqa: F401  (autouse: each test from seed 0)
)
from retrograd.codegen import torch_program
from retrograd.codegen.torch_linear import Folds
from retrograd.codegen.torch_program import generate_torch_program
from retrograd.runtime.torch_program import TorchProgramExecutable

F64 = torch.float64


def _run(program, source, inputs):
    return TorchProgramExecutable(program, source)([t.clone() for t in inputs])


def _unfolded(program, monkeypatch) -> str:
    """The program as written before torch_linear.py: every permute its own call."""
    with monkeypatch.context() as patch:
        patch.setattr(torch_program, "fold_transposes", lambda program, donor: Folds())
        return generate_torch_program(program)


def _body(source: str) -> str:
    return source.split("def run")[1]


def _check(fn, inputs, monkeypatch) -> str:
    """Write ``fn``'s program; its results equal the unfolded program's
    (``torch.equal``) and eager's in float64. Returns the run body."""
    program, _, _ = fuse(fn, *inputs)
    source = generate_torch_program(program)
    got = _run(program, source, inputs)
    before = _run(program, _unfolded(program, monkeypatch), inputs)
    expected = fn(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for a, b, e in zip(got, before, expected):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, e)
    return _body(source)


def test_addmm_of_a_transposed_weight_is_one_linear_call(monkeypatch):
    x, w, b = torch.randn(6, 5, dtype=F64), torch.randn(3, 5, dtype=F64), torch.randn(3, dtype=F64)
    body = _check(lambda x, w, b: torch.addmm(b, x, w.permute(1, 0)), [x, w, b], monkeypatch)
    assert "= torch.nn.functional.linear(arg0_1, arg1_1, arg2_1)" in body
    assert "torch.permute" not in body and "torch.addmm" not in body


def test_mm_of_a_transposed_weight_is_one_linear_call(monkeypatch):
    x, w = torch.randn(6, 5, dtype=F64), torch.randn(3, 5, dtype=F64)
    body = _check(lambda x, w: torch.mm(x, w.permute(1, 0)), [x, w], monkeypatch)
    assert "= torch.nn.functional.linear(arg0_1, arg1_1)" in body
    assert "torch.permute" not in body and "torch.mm" not in body


def test_a_chain_of_permutes_is_one_permute_of_its_base(monkeypatch):
    """The backward's ``permute(permute(permute(g)))``: one call; read as the
    first operand of ``mm`` (not a linear), it stays a permute."""
    g, x = torch.randn(6, 5, dtype=F64), torch.randn(6, 4, dtype=F64)
    body = _check(lambda g, x: torch.mm(g.permute(1, 0).permute(1, 0).permute(1, 0), x),
                  [g, x], monkeypatch)
    assert len(body.split("torch.permute(")) == 2
    assert "= torch.permute(arg0_1, [1, 0])" in body


def test_a_chain_ending_in_a_linear_is_one_linear_call(monkeypatch):
    x, w = torch.randn(6, 5, dtype=F64), torch.randn(3, 5, dtype=F64)
    body = _check(lambda x, w: torch.mm(x, w.permute(1, 0).permute(1, 0).permute(1, 0)),
                  [x, w], monkeypatch)
    assert "= torch.nn.functional.linear(arg0_1, arg1_1)" in body
    assert "torch.permute" not in body


@pytest.mark.parametrize("case", ["also_summed", "returned", "scaled_addmm"])
def test_a_transpose_read_otherwise_is_written(case, monkeypatch):
    """Another reader of the transpose, the transpose as an output, or an
    ``addmm`` that ``at::linear`` does not make (``beta``): unfolded."""
    x, w, b = torch.randn(6, 5, dtype=F64), torch.randn(3, 5, dtype=F64), torch.randn(3, dtype=F64)

    def fn(x, w, b):
        t = w.permute(1, 0)
        if case == "scaled_addmm":
            return torch.addmm(b, x, t, beta=2.0)
        y = torch.addmm(b, x, t)
        return (y, t.sum()) if case == "also_summed" else (y, t)
    body = _check(fn, [x, w, b], monkeypatch)
    assert "torch.nn.functional.linear" not in body
    assert "torch.permute(arg1_1, [1, 0])" in body


def test_a_weight_the_plan_frees_after_its_transpose_lives_until_the_linear():
    """The plan deletes ``w`` after the transpose, its last reader; written in
    ``F.linear``, ``w`` is read later: its delete waits for that call."""
    x, w = torch.randn(6, 5), torch.randn(3, 5)
    program, _, _ = fuse(lambda x, w: torch.mm(x.sin(), w.permute(1, 0)), x, w)
    transpose = next(i for i, k in enumerate(program.kernels) if k.node_names == ["permute"])
    program.frees = {transpose: ["arg1_1"]}
    body = _body(generate_torch_program(program))
    assert body.index("torch.nn.functional.linear(") < body.index("del arg1_1")
    [got] = _run(program, generate_torch_program(program), [x, w])
    assert torch.equal(got, torch.mm(x.sin(), w.t()))
