"""The torch program's liveness (codegen/torch_liveness.py): deletes at the
last use, and pointwise results written over an operand that dies there,
never over an input, a constant, or storage a live view still reads."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import retrograd
import torch
from checks import eager_step
from pass_helpers import (
    buffer,
    fuse,
    run_gm,
    seeded,  # noqa: F401  (autouse: each test from seed 0)
    trace,
)
from retrograd.codegen.torch_liveness import Statement, tighten
from retrograd.codegen.torch_program import generate_torch_program
from retrograd.ir import Kernel, Program
from retrograd.runtime.torch_program import TorchProgramExecutable
from torch import fx
from zoo import ZOO, clone_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from measuring import profiled_peak

aten = torch.ops.aten


def _node(gm, target):
    return next(n for n in gm.graph.nodes if n.target is target)


def test_a_fused_chain_writes_each_step_over_the_value_it_consumes():
    """A chain of pointwise ops holds its input and one value, as eager's
    in-place modules do (was: two values per step, a new one per op)."""
    x = torch.randn(4, 8)
    program, _, gm = fuse(lambda x: x.sin().cos().exp().neg().abs().sqrt(), x)
    source = generate_torch_program(program)
    body = source.split("def run")[1]
    # cos .. sqrt each over its operand, as the in-place method (``a.cos_()``)
    assert len(re.findall(r"^    \w+ = \w+\.\w+_\(", body, re.MULTILINE)) == 5
    [name] = program.inputs
    assert f"out={name})" not in body   # never over the caller's input
    before = x.clone()
    [got] = TorchProgramExecutable(program, source)([x])
    torch.testing.assert_close(got, run_gm(gm, [before])[0])
    assert torch.equal(x, before)


def test_an_input_that_dies_is_not_written_over():
    """The plan may free an input after its last reader; the caller (or
    autograd, for a second backward) may still hold it."""
    x = torch.randn(3, 4)
    gm = trace(lambda x: x * 2, x)
    mul = _node(gm, aten.mul.Tensor)
    [placeholder] = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    buffers = {placeholder: buffer(placeholder, (3, 4), "input"),
               mul.name: buffer(mul.name, (3, 4), "output")}
    program = Program("unit", buffers, [Kernel("kernel_0", "triton", [mul],
                                               outputs=[mul.name])],
                      [placeholder], [mul.name], frees={0: [placeholder]})
    source = generate_torch_program(program)
    assert "out=" not in source
    before = x.clone()
    [got] = TorchProgramExecutable(program, source)([x])
    torch.testing.assert_close(got, before * 2)
    assert torch.equal(x, before)


def _statements(gm, with_view: bool) -> list[Statement]:
    """``s = sin(x); [v = s.view]; t = cos(s); del s; ...`` over ``gm``'s nodes."""
    sin, cos = _node(gm, aten.sin.default), _node(gm, aten.cos.default)
    view = _node(gm, aten.view.default)
    lines = [Statement("x, = args"), Statement(f"{sin.name} = torch.sin(x)", sin,
                                                variable=sin.name)]
    if with_view:
        lines.append(Statement(f"{view.name} = {sin.name}.view([12])", view, aliasing=True,
                               variable=view.name))
    lines += [Statement(f"{cos.name} = torch.cos({sin.name})", cos, variable=cos.name),
              Statement(f"del {sin.name}")]
    if with_view:
        lines += [Statement(f"y = {view.name} * 2"), Statement(f"del {view.name}")]
    return lines


def test_storage_a_live_view_reads_is_not_written_over():
    def fn(x):
        s = x.sin()
        return s.cos(), s.view(12) * 2
    gm = trace(fn, torch.randn(3, 4))
    cos = _node(gm, aten.cos.default).name
    sin = _node(gm, aten.sin.default).name
    alone = tighten(_statements(gm, with_view=False), {"x"})
    assert f"{cos} = {sin}.cos_()" in alone   # the control: it would
    viewed = tighten(_statements(gm, with_view=True), {"x"})
    assert f"{cos} = torch.cos({sin})" in viewed


def test_a_kernel_input_is_deleted_at_its_last_reader_inside_the_kernel():
    """The plan frees between kernels; inside a fused kernel written as torch
    calls, its input dies at the op that last reads it."""
    def fn(x):
        return x.sin() * 2 + 1
    gm = trace(fn, torch.randn(3, 4))
    sin = _node(gm, aten.sin.default)
    lines = [Statement("x, = args"), Statement("a = torch.exp(x)", None, variable="a"),
             Statement(f"{sin.name} = torch.sin(a)"), Statement("b = torch.mul(x, 2)"),
             Statement("del a, x")]
    source = "\n".join(tighten(lines, {"x"}))
    assert source.index("del a") < source.index("b = torch.mul")


def _gelu_and_derivative(x, w):
    """GELU of ``x @ w`` and its derivative, as the joint graph computes them."""
    h = x @ w
    a = h * 0.5
    b = torch.erf(h * 0.7071067811865476) + 1
    derivative = b * 0.5 + h * torch.exp(h * h * -0.5) * 0.3989422804014327
    return a * b, derivative


def _gelu_program(x, w) -> tuple[Program, fx.GraphModule]:
    """``mm`` as an extern call, everything after it one fused kernel; the
    product freed after that kernel, as the plan frees it."""
    gm = trace(_gelu_and_derivative, x, w)
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    [output] = [n for n in gm.graph.nodes if n.op == "output"]
    outputs = [n.name for n in output.args[0]]
    inputs = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    buffers = {n.name: buffer(n.name, tuple(n.meta["val"].shape),
                              "input" if n.op == "placeholder" else
                              "output" if n.name in outputs else "temporary")
               for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)}
    kernels = [Kernel("kernel_0", "extern", calls[:1], outputs=[calls[0].name]),
               Kernel("kernel_1", "triton", calls[1:], outputs=outputs)]
    return Program("unit", buffers, kernels, inputs, outputs,
                   frees={1: [calls[0].name]}), gm


def test_a_fused_kernel_runs_in_the_order_that_holds_least(monkeypatch):
    """GELU with its derivative holds four activation-sized values in fx's
    order and three when the derivative's chain runs first and the last
    reader of the product writes over it (LoRA's and GPT-2's MLP kernel)."""
    from retrograd.codegen import torch_program
    x, w = torch.randn(64, 16), torch.randn(16, 64)
    program, gm = _gelu_program(x, w)
    size = 64 * 64 * 4

    def peak() -> int:
        source = generate_torch_program(program)
        executable = TorchProgramExecutable(program, source)
        got = executable([x, w])
        for a, b in zip(got, run_gm(gm, [x, w]), strict=True):
            torch.testing.assert_close(a, b)
        return profiled_peak(lambda: executable([x, w]))
    ordered = peak()
    monkeypatch.setattr(torch_program, "order_for_memory", lambda nodes, *rest: nodes)
    fx_order = peak()
    assert ordered < 3.5 * size < fx_order   # (plus a few bytes of scalars)


def _step_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
    lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.05)], ids=["sgd", "adamw"])
def test_step_updates_written_over_the_donated_inputs_match_eager(make):
    """compile_step's new parameters and optimizer state are written over the
    old ones inside the torch program (the plan's donation, ``out=``), so
    nothing is copied back afterwards; values match an eager loop."""
    mine, eager = _step_model(), _step_model()
    optimizer, reference = make(list(mine.parameters())), make(list(eager.parameters()))
    step = retrograd.compile_step(mine, _loss, optimizer, executor="torch")
    torch.manual_seed(1)
    for count in range(3):
        x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
        if count == 1:
            pointers = [p.data_ptr() for p in mine.parameters()]
        loss = step(x, y)
        expected = eager_step(eager, reference, _loss, x, y)
        torch.testing.assert_close(loss.detach(), expected.detach())
    for p, q in zip(mine.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
        for key, value in reference.state[q].items():
            torch.testing.assert_close(optimizer.state[p][key], value, rtol=1e-5, atol=1e-6)
    assert [p.data_ptr() for p in mine.parameters()] == pointers


def _mlp_step_peak(compiled: bool) -> int:
    """Measured peak of one SGD (momentum) step of the zoo MLP after two warm-ups."""
    entry = ZOO["mlp"]
    torch.manual_seed(0)
    model, inputs = entry.model(), entry.inputs()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def loss_of(m, *batch):
        return entry.run(m, batch)
    if compiled:
        step = retrograd.compile_step(model, loss_of, optimizer, executor="torch")
    else:
        def step(*batch):
            eager_step(model, optimizer, loss_of, *batch)
    for _ in range(2):
        step(*clone_inputs(inputs))
    batch = clone_inputs(inputs)
    return profiled_peak(lambda: step(*batch))


def test_the_step_peaks_below_an_eager_loop():
    """The zoo MLP's compile_step under the torch program peaked at 2.0x an
    eager loop's (3,720 against 1,848 bytes): every new parameter and
    momentum buffer was a new tensor, copied back after the program."""
    assert _mlp_step_peak(compiled=True) <= _mlp_step_peak(compiled=False)
