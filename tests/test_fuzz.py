"""Differential fuzzing: random programs through retrograd against eager.

Programs (tests/fuzz_programs.py, fuzz_ops.py, fuzz_shapes.py) chain a few
pointwise ops, casts, reductions, views, indexing ops and scaled dot-product
attention over random float32/float64/bfloat16/float16/integer inputs;
tests/fuzz_check.py compiles each with ``retrograd.compile`` (generated
Triton under the interpreter) or ``torch.compile(backend="retrograd")`` and
compares outputs and input gradients with eager and a float64 reference.
A failure is shrunk by hypothesis and printed as Python source.

CI runs a fixed, derandomized budget here; ``benchmarks/fuzz.py`` runs as
many as asked and writes failures to a file. Each bug the fuzzer found has
its minimal program below as a regression test (``REGRESSIONS``, or a plain
test where the fuzzer's tolerance alone would not catch it).
"""

from __future__ import annotations

import fuzz_check
import pytest
import retrograd
import torch
from fuzz_programs import program_from_source, programs
from hypothesis import HealthCheck, given, settings

_QUIET = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]


# ---------------------------------------------------------------- the budget
@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=_QUIET)
@given(programs())
def test_fuzz_compile(program):
    fuzz_check.check(program, "compile")


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=_QUIET)
@given(programs(max_ops=4))
def test_fuzz_torch_compile(program):
    try:
        fuzz_check.check(program, "torch.compile")
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------- the checker itself
def test_check_catches_a_wrong_output(monkeypatch):
    """The comparison fails on an output 0.1% off (so a pass means something)."""
    program = program_from_source(_ATTENTION)

    def off_by_a_little(fn, face):
        return lambda *xs: tuple(y * 1.001 for y in fn(*xs))

    monkeypatch.setattr(fuzz_check, "_compile", off_by_a_little)
    with pytest.raises(fuzz_check.FuzzFailure, match="output 0"):
        fuzz_check.check(program)


def test_check_catches_a_wrong_gradient(monkeypatch):
    program = program_from_source(_ATTENTION)

    class Scaled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            return y.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * 1.001

    def wrong_backward(fn, face):
        return lambda *xs: tuple(Scaled.apply(y) for y in fn(*xs))

    monkeypatch.setattr(fuzz_check, "_compile", wrong_backward)
    with pytest.raises(fuzz_check.FuzzFailure, match="grad of input"):
        fuzz_check.check(program)


_ATTENTION = '''
import torch
import torch.nn.functional as F


def fn(x0, x1, x2):
    v3 = F.scaled_dot_product_attention(x0, x1, x2, is_causal=True)
    return v3,


def make_inputs():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn((1, 2, 3, 4), generator=g).requires_grad_()
    x1 = torch.randn((1, 2, 5, 4), generator=g).requires_grad_()
    x2 = torch.randn((1, 2, 5, 3), generator=g).requires_grad_()
    return [x0, x1, x2]
'''

# ---------------------------------------------------------------- regressions
#: Minimal programs of bugs the fuzzer found, each fixed: (id, source).
REGRESSIONS = [
    # index_put whose values are its self: the scatter kernel was not passed
    # the values' pointer (self was read by the copy step only).
    ("index_put_values_are_self", '''
import torch
import torch.nn.functional as F


def fn(x0, i1):
    v2 = x0.index_put((i1,), x0)
    return v2,


def make_inputs():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn((1, 4, 1), generator=g).requires_grad_()
    i1 = torch.randperm(1, generator=g)[:1]
    return [x0, i1]
'''),
    ("attention_causal", _ATTENTION),
    # a kernel written in place through a reshape (its [1] result over a
    # dying [1, 1] product): the wrapper bound the result to the product's
    # tensor, [1, 1], and the expand after it failed
    ("in_place_through_a_reshape", '''
import torch
import torch.nn.functional as F


def fn(x0):
    v1 = x0.sum(0, keepdim=False)
    v2 = v1 @ x0
    v3 = v1 @ x0
    return v2, v3,


def make_inputs():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn((1, 1), generator=g).requires_grad_()
    return [x0]
'''),
]


@pytest.mark.parametrize("source", [s for _, s in REGRESSIONS], ids=[n for n, _ in REGRESSIONS])
def test_fuzz_regression(source):
    fuzz_check.check(program_from_source(source))


def test_widening_cast_rounds_half_first():
    """Found by the fuzzer: the gradient of a float32 input through a bfloat16
    cast is a bfloat16 sum, which the cast back to float32 took unrounded from
    its float32 register. The sum is one bfloat16 op in eager too, so the
    gradient must be eager's bit for bit (the fuzzer's float64 reference alone
    accepts the more precise sum)."""
    def fn(x):
        v = x.to(torch.bfloat16)
        return -v, v

    x = torch.randn(64, generator=torch.Generator().manual_seed(0))
    upstream = [torch.randn(64, generator=torch.Generator().manual_seed(i)).bfloat16()
                for i in range(2)]
    compiled = retrograd.compile(fn, executor="auto")
    grads = []
    for function in (fn, compiled):
        leaf = x.clone().requires_grad_()
        grads.append(torch.autograd.grad(function(leaf), leaf, upstream)[0])
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("face", ["standalone", "torch.compile"])
def test_saved_input_mutated_later(face):
    """Found by the fuzzer (with scaled_dot_product_attention's key; the
    smallest form below): eager saves ``x1.mT * 2``, retrograd saves the view
    ``x1.mT`` and recomputes the product in the backward, but ``x1.add_``
    has changed ``x1`` by then. (aot_eager silently returns a wrong gradient
    here; retrograd raised autograd's version error.) Now the backward reads
    a copy taken in the forward (checkpoint.protect_mutated_inputs)."""
    def fn(x0, x1):
        v = x0 * (x1.mT * 2)
        x1.add_(0.5)
        return v

    def make_inputs():
        g = torch.Generator().manual_seed(0)
        return [torch.randn(3, 2, generator=g).requires_grad_(), torch.randn(2, 3, generator=g)]

    xs = make_inputs()
    expected = torch.autograd.grad(fn(*xs).sum(), xs[0])[0]
    xs = make_inputs()
    torch._dynamo.reset()
    compiled = retrograd.compile(fn) if face == "standalone" else \
        torch.compile(fn, backend="retrograd")
    got = torch.autograd.grad(compiled(*xs).sum(), xs[0])[0]
    assert torch.equal(xs[1], make_inputs()[1] + 0.5)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("face", ["standalone", "torch.compile"])
@pytest.mark.parametrize("view", ["unfold", "as_strided", "unfold_of_input"])
def test_overlapping_output_view_gradient(view, face):
    """Windows of size 2, step 1 over dim 0 overlap: the middle row's gradient
    sums two windows. AOTAutograd gave such an output of an intermediate a
    wrong tangent (aot_eager too); it is now returned as a copy
    (capture._OutputsOwnMemory), while a view of an input keeps aliasing it.
    Found as part of a longer program by benchmarks/fuzz.py (seed 802)."""
    fn = {"unfold": lambda x: (x * 2).unfold(-3, 2, 1),
          "as_strided": lambda x: (x * 2).as_strided((4, 3), (1, 1)),
          "unfold_of_input": lambda x: x.unfold(-3, 2, 1)}[view]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 5, generator=generator)
    upstream = torch.randn(fn(x).shape, generator=generator)
    torch._dynamo.reset()
    compiled = retrograd.compile(fn) if face == "standalone" else \
        torch.compile(fn, backend="retrograd")
    grads, outputs = [], []
    for function in (fn, compiled):
        leaf = x.clone().requires_grad_()
        outputs.append(function(leaf))
        grads.append(torch.autograd.grad(outputs[-1], leaf, upstream)[0])
    torch.testing.assert_close(outputs[1], outputs[0])
    torch.testing.assert_close(grads[1], grads[0])
    if view == "unfold_of_input":
        assert outputs[1].stride() == outputs[0].stride()


def test_fill_into_half_softmax():
    """A cast of a constant fill is folded at codegen: it was emitted as
    ``_round_to_bf16(0.5)``, a method call on a Python float, which the
    interpreter refused. Found by benchmarks/fuzz.py (torch.compile face, seed 701)."""
    def fn(x):
        return torch.softmax((-x).fill_(0.5), 0)

    x = torch.randn(2, generator=torch.Generator().manual_seed(0)).bfloat16()
    torch.testing.assert_close(retrograd.compile(fn)(x), fn(x))


def test_a_half_fill_holds_its_rounded_value():
    """``full_like(x, 0.1)`` in bfloat16 holds 0.10009765625, and so must the
    literal codegen writes for it: with 0.1 itself, sums came out 1 ulp off."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)).bfloat16()

    def fn(x):
        return x + torch.full_like(x, 0.1)

    assert torch.equal(retrograd.compile(fn)(x), fn(x))
