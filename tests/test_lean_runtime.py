"""The lean autograd runtime (compiler/lean_runtime.py) against eager.

A graph runs through retrograd's own small ``autograd.Function`` when
AOTAutograd's metadata proves its runtime wrappers have nothing to do, and
through AOTAutograd's otherwise. Both are checked against eager gradients:
the zoo models (batch norm's running statistics are a write the lean runtime
makes), and one graph per fall-back condition (an output aliasing an input or
an intermediate, an input mutation that needs a gradient), plus the autograd
semantics the lean runtime reproduces (outputs without gradients,
``retain_graph``, ``create_graph``, gradients of another layout). The first
call of each graph runs AOTAutograd's runtime, so each test calls at least
twice.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import retrograd
import retrograd.lean_runtime
import torch
from pass_helpers import seeded  # noqa: F401  (autouse: each test from seed 0)
from zoo import ZOO, assert_parity, training_step


def _runtimes(compiled) -> list:
    return compiled._cache.last.compiler.runtimes


def _lean(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s autograd graph holds retrograd's lean Function."""
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "LeanFunctionBackward":
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


@pytest.mark.parametrize("name", ["mlp", "cnn", "attention_block"])
def test_zoo_steps_run_lean_and_match_eager(name):
    entry = ZOO[name]
    model = entry.model()
    reference = copy.deepcopy(model)
    inputs = entry.inputs()
    compiled = retrograd.compile(model, executor="torch")
    for step in range(3):
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        expected = training_step(entry, reference, reference, inputs)
        got = training_step(entry, compiled, model, inputs)
        assert_parity(got, expected, tolerance=1e-5)
    for (label, mine), (_, theirs) in zip(model.named_buffers(), reference.named_buffers()):
        # batch norm's running statistics: written back after each lean forward
        torch.testing.assert_close(mine, theirs, msg=label)
    assert _runtimes(compiled) == ["lean"]
    assert _lean(entry.run(compiled, inputs))


def _compare(function, *inputs, runtime: str, gradient=None):
    """``function`` compiled against eager on two calls: outputs, and the
    gradients of the first output's (weighted) sum; returns the compiled one."""
    compiled = retrograd.compile(function, executor="torch")
    for _ in range(2):
        mine = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
        theirs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
        got, expected = compiled(*mine), function(*theirs)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b)
            assert a.requires_grad == b.requires_grad
        if gradient is None:
            got[0].sum().backward()
            expected[0].sum().backward()
        else:
            got[0].backward(gradient)
            expected[0].backward(gradient)
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a.grad, b.grad)
    assert _runtimes(compiled) == [runtime]
    return compiled


def test_an_output_aliasing_an_intermediate_keeps_aotautograds_runtime():
    def f(x):
        y = x.sin() * 2
        return y, y.view(-1)
    _compare(f, torch.randn(3, 4, requires_grad=True),
             runtime="an output aliasing an input or intermediate")


def test_an_output_aliasing_an_input_keeps_aotautograds_runtime():
    def f(x, w):
        return (x * w).sum(1), x.view(-1)
    _compare(f, torch.randn(3, 4, requires_grad=True), torch.randn(4, requires_grad=True),
             runtime="an output aliasing an input or intermediate")


def test_a_write_into_an_input_without_gradient_runs_lean():
    def f(w, counts):
        counts.add_(1)
        return (w * counts).sin(), counts.sum()
    w, counts = torch.randn(5, requires_grad=True), torch.zeros(5)
    compiled = _compare(f, w, counts, runtime="lean")
    kept = torch.zeros(5)
    for _ in range(3):
        compiled(w, kept)
    torch.testing.assert_close(kept, torch.full((5,), 3.0))   # written on every call


def test_an_input_mutation_needing_a_gradient_keeps_aotautograds_runtime():
    def f(w, x):
        x.mul_(2)
        return (w * x).sum(), x
    def run(function, w, base):
        x = base * 1   # a non-leaf input that requires grad, written in place
        loss, written = function(w, x)
        loss.backward()
        return written.detach(), w.grad, base.grad
    compiled = retrograd.compile(f, executor="torch")
    for _ in range(2):
        w, base = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
        w2, base2 = w.detach().clone().requires_grad_(), base.detach().clone().requires_grad_()
        for got, expected in zip(run(compiled, w, base), run(f, w2, base2)):
            torch.testing.assert_close(got, expected)
    assert _runtimes(compiled) == [("an input mutation other than a data write into an "
                                    "input that needs no gradient")]


def test_an_output_without_gradient_is_non_differentiable():
    def f(x):
        y = x.sin()
        return y * 3, y.argmax(), y.detach() + 1
    _compare(f, torch.randn(3, 4, requires_grad=True), runtime="lean")


def test_a_gradient_of_another_layout_matches_eager():
    def f(x, w):
        return (x @ w).tanh(),
    gradient = torch.randn(5, 3).t()   # non-contiguous
    _compare(f, torch.randn(3, 4, requires_grad=True), torch.randn(4, 5, requires_grad=True),
             runtime="lean", gradient=gradient)


def test_retain_graph_backward_twice_matches_eager():
    def f(x, w):
        return ((x @ w).relu() ** 2).sum(),
    compiled = retrograd.compile(f, executor="torch")
    for _ in range(2):
        x, w = torch.randn(3, 4, requires_grad=True), torch.randn(4, 2, requires_grad=True)
        x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        (got,), expected = compiled(x, w), f(x2, w2)[0]
        for loss in (got, expected):
            loss.backward(retain_graph=True)
            loss.backward()
        torch.testing.assert_close(x.grad, x2.grad)
        torch.testing.assert_close(w.grad, w2.grad)
    assert _runtimes(compiled) == ["lean"] and _lean(got)


def test_create_graph_gives_first_gradients_and_refuses_a_second():
    def f(x):
        return (x.sin() * x).sum(),
    compiled = retrograd.compile(f, executor="torch")
    x = torch.randn(6, requires_grad=True)
    compiled(x)
    (loss,) = compiled(x)
    assert _lean(loss)
    (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    torch.testing.assert_close(grad, x.cos() * x + x.sin())
    assert grad.requires_grad
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


def test_no_grad_calls_keep_working_after_lean_ones():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    compiled = retrograd.compile(model, executor="torch")
    x = torch.randn(3, 4)
    for _ in range(2):
        compiled(x).sum().backward()
    with torch.no_grad():
        out = compiled(x)
    assert not out.requires_grad
    torch.testing.assert_close(out, model(x))


def test_autograd_errors_hold_as_in_eager():
    """A saved input written in place before the backward, and a second
    backward without retain_graph, raise as they do in eager."""
    def f(x, w):
        return ((x * w).sin()).sum(),
    compiled = retrograd.compile(f, executor="torch")
    compiled(torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True))
    for function in (compiled, f):
        x, w = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
        (loss,) = function(x, w)
        with torch.no_grad():
            w.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
        (loss,) = function(torch.randn(4, requires_grad=True), w)
        assert _lean(loss) == (function is compiled)
        loss.backward()
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            loss.backward()
    assert _runtimes(compiled) == ["lean"]


_PEAK_SCRIPT = """
import gc, sys, torch, retrograd, retrograd.lean_runtime
from zoo import ZOO, forward_backward_peak
name, keep = sys.argv[1], sys.argv[2] == "keep"
if keep:
    retrograd.lean_runtime.why_not_lean = lambda spec: "kept for a test"
entry = ZOO[name]
torch.manual_seed(0)
model, inputs = entry.model(), entry.inputs()
compiled = retrograd.compile(model, executor="torch")
gc.collect()
peaks = [forward_backward_peak(entry, model, compiled, inputs) for _ in range(3)]
print(max(peaks), compiled._cache.last.compiler.runtimes)
"""


def _fresh_peak(name: str, keep: bool) -> tuple[int, str]:
    """A step's measured peak and the runtimes chosen, in a fresh process:
    a peak measured late in a long process reads that process's history too
    (the CNN's oneDNN allocations: 320 bytes apart between the two runtimes
    once in the full suite, equal in a fresh process), as BENCHMARKS.md's
    peak tables say. The highest of three readings: a reading now and then
    comes out low (a free of memory allocated before the profiler started),
    never high."""
    tests = Path(__file__).resolve().parent
    result = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, name, "keep" if keep else "lean"],
                            cwd=tests, capture_output=True, text=True, timeout=600, check=False,
                            env={**os.environ, "PYTHONPATH": str(tests)})
    assert result.returncode == 0, result.stderr[-3000:]
    peak, runtimes = result.stdout.strip().splitlines()[-1].split(" ", 1)
    return int(peak), runtimes


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_the_step_peaks_as_under_aotautograds_runtime(name):
    """The lean runtime holds nothing AOTAutograd's does not: the measured
    peak of a step is the same (a tangent kept by a loop variable of the
    backward's prologue once raised the MLP's by 64 bytes)."""
    lean, lean_runtimes = _fresh_peak(name, keep=False)
    kept, kept_runtimes = _fresh_peak(name, keep=True)
    assert lean_runtimes == "['lean']" and kept_runtimes == "['kept for a test']"
    assert lean == kept
