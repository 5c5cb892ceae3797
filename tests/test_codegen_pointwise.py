"""Generated pointwise kernels against eager PyTorch, under Triton's interpreter.

Most tests compile a small function with ``retrograd.compile`` (the whole
pipeline: capture, passes, codegen, interpreter) and compare with eager on
random inputs; every one of them also checks in the report that the
pointwise ops really ran as Triton kernels. A few build the program directly
(make_fx + fusion + codegen) to look at the generated source, or to launch a
kernel on views into sentinel-padded buffers.

Tolerances follow docs/DESIGN: relative error ``||got - ref|| / ||ref||``
under 1e-5 for float32 and 1e-2 for float16/bfloat16 (registers hold half
values as float32, so a fused chain rounds once where eager rounds after
every op); NaN and inf must sit where eager has them.
"""

from __future__ import annotations

import math

import numpy
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.testing import FileCheck

import retrograd
from retrograd.codegen import generate_sources
from retrograd.decompositions import decomposition_table
from retrograd.dump import Dumper
from retrograd.options import Options
from retrograd.passes import buffer_reuse, cleanup, fusion
from retrograd.pipeline import OpSupport, PassContext
from retrograd.runtime.device import interpreter_mode
from retrograd.runtime.loader import load_module, write_source
from checks import TOLERANCE, relative_error


# ---------------------------------------------------------------- helpers
def assert_matches(got: torch.Tensor, ref: torch.Tensor, tolerance: float | None = None,
                   strides: bool = False) -> None:
    """Same dtype and shape; exact for ints and bools; for floats the same NaN
    and inf positions and a small relative error on the finite rest."""
    assert isinstance(got, torch.Tensor), f"expected a tensor, got {type(got).__name__}"
    assert got.dtype == ref.dtype, f"dtype {got.dtype} != eager's {ref.dtype}"
    assert got.shape == ref.shape, f"shape {tuple(got.shape)} != eager's {tuple(ref.shape)}"
    if strides and ref.numel() > 1:
        assert got.stride() == ref.stride(), f"strides {got.stride()} != eager's {ref.stride()}"
    if not ref.is_floating_point():
        assert torch.equal(got, ref), f"values differ:\n{got}\n{ref}"
        return
    limit = TOLERANCE[ref.dtype] if tolerance is None else tolerance
    got, ref = got.double(), ref.double()
    assert torch.equal(got.isnan(), ref.isnan()), f"NaN positions differ:\n{got}\n{ref}"
    infinite = ref.isinf()
    assert torch.equal(got[infinite], ref[infinite]), "infinities differ"
    finite = ref.isfinite()
    assert bool(got[finite].isfinite().all()), "a finite value became inf or NaN"
    error = relative_error(got, ref)
    assert error < limit, f"relative error {error:.3g} >= {limit:g}"


def assert_ran_in_triton(report: dict, extern: int | None = 0) -> None:
    kernels = report["kernels"]
    assert kernels["triton"] >= 1, kernels
    assert kernels["pointwise_ops_in_triton"] == kernels["pointwise_ops"], kernels
    if extern is not None:
        assert kernels["extern"] == extern, kernels


def check(fn, *inputs, tolerance: float | None = None, strides: bool = False,
          kernels: int | None = None):
    """Compile ``fn`` for inference, run it on ``inputs`` and compare with eager."""
    compiled = retrograd.compile(fn, executor="interpret")
    with torch.no_grad():
        got = compiled(*inputs)
        ref = fn(*inputs)
    if isinstance(ref, tuple):
        assert isinstance(got, tuple) and len(got) == len(ref)
        for got_item, ref_item in zip(got, ref):
            assert_matches(got_item, ref_item, tolerance, strides)
    else:
        assert_matches(got, ref, tolerance, strides)
    assert set(compiled.reports) == {"forward"}
    assert_ran_in_triton(compiled.reports["forward"])
    if kernels is not None:
        assert compiled.reports["forward"]["kernels"]["triton"] == kernels
    return compiled


def randn(*shape, dtype=torch.float32, low: float | None = None):
    """Random values, never zeros; ``low`` shifts them to at least that magnitude."""
    values = torch.randn(shape, dtype=torch.float32)
    if low is not None:
        values = values.abs() + low
    return values.to(dtype)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(1234)


# ---------------------------------------------------------------- ranks and broadcasting
def chain(x, y):
    return torch.tanh(x * y + 0.5).sigmoid() / 3.0 - y


@pytest.mark.parametrize("shape", [(), (7,), (3, 5), (2, 3, 4), (2, 3, 2, 3)],
                         ids=lambda s: f"rank{len(s)}")
def test_ranks_zero_to_four(shape):
    compiled = check(chain, randn(*shape), randn(*shape), kernels=1)
    assert compiled.reports["forward"]["kernels"]["pointwise_ops"] >= 5


@pytest.mark.parametrize("shape_x, shape_y", [
    ((3, 4), (4,)),            # missing leading dim
    ((3, 1), (1, 4)),          # size-1 dims on both sides
    ((2, 1, 4), (3, 1)),       # rank 3 against rank 2, both broadcast
    ((2, 3, 4), ()),           # a 0-d tensor
    ((), (2, 3)),              # the 0-d tensor first
    ((1,), (2, 3)),
    ((5, 1, 1, 3), (1, 2, 3)),  # rank 4
    ((4, 1), (4, 1)),
])
def test_broadcasting(shape_x, shape_y):
    check(chain, randn(*shape_x), randn(*shape_y))


def test_zero_dim_tensors_only():
    check(lambda x, y: (x * y).exp() - y, randn(), randn())


def test_python_scalars():
    check(lambda x: 3 - x * 0.5 + 2.0 / x - 7 + x * 2, randn(4, 5, low=0.1))


def test_python_scalars_on_integer_tensors():
    check(lambda x: x * 3 + 1 - (x > 2).to(torch.int64), torch.randint(1, 9, (4, 5)))


def test_more_programs_than_one():
    """Over 64K elements the interpreter's block no longer covers the tensor:
    two programs, the second mostly masked off."""
    x, y = randn(257, 260), randn(260)
    compiled = check(lambda x, y: torch.sigmoid(x * y) + x, x, y)
    assert compiled.reports["forward"]["kernels"]["triton"] == 1


# ---------------------------------------------------------------- layouts
@pytest.mark.parametrize("make", [
    lambda: randn(4, 6).t(),
    lambda: randn(2, 3, 4, 5).permute(0, 3, 1, 2),
    lambda: randn(8, 9)[::2, 1::3],
    lambda: randn(2, 10, 7)[:, 3:9:2, ::3],
    lambda: randn(4, 1).expand(4, 6),
    lambda: randn(6).expand(3, 2, 6),
    lambda: randn(20)[5:17].view(3, 4),     # storage offset
], ids=["transposed", "permuted", "stepped", "stepped3d", "expanded", "expanded_lead",
        "offset"])
def test_non_contiguous_inputs(make):
    x = make()
    y = randn(*x.shape)
    check(lambda x, y: (x.exp() * y).tanh() + x, x, y)


@pytest.mark.parametrize("make", [
    lambda: randn(4, 6).t(),
    lambda: randn(2, 3, 4, 5).permute(0, 3, 1, 2),
    lambda: randn(4, 6)[:, ::2],
], ids=["transposed", "permuted", "stepped"])
def test_unary_output_keeps_eager_layout(make):
    check(lambda x: torch.sigmoid(x) * 2.0, make(), strides=True)


@pytest.mark.parametrize("fn, shapes", [
    (lambda x, y: x.exp().expand(3, 4) * y, [(3, 1), (3, 4)]),
    (lambda x: (x.exp().unsqueeze(0) * 2).squeeze(0).sin(), [(3, 4)]),
    (lambda x: x.exp()[:, 1:] * 2, [(3, 4)]),
    (lambda x: x.exp()[1] * 2, [(3, 4)]),
    (lambda x: (x.exp().view(12), x.exp() * 2), [(3, 4)]),
    (lambda x: x.exp().permute(1, 0), [(3, 4)]),
    (lambda x: x.t().reshape(12).exp(), [(3, 4)]),
    (lambda x, y: x.exp().view(4, 3) + y.view(1, 3), [(12,), (3,)]),
    (lambda x, y: x.exp().unsqueeze(1) * y, [(3,), (3, 4)]),
    (lambda x: (x, x * 2, x.view(12)), [(3, 4)]),
], ids=["expand", "unsqueeze_squeeze", "slice", "select", "view_output", "permute_output",
        "transpose_reshape", "reshape_broadcast", "unsqueeze_broadcast", "input_outputs"])
def test_views_of_values_inside_and_outside_kernels(fn, shapes):
    check(fn, *(randn(*shape) for shape in shapes))


def test_expanded_input_of_a_binary_op():
    x = randn(3, 1).expand(3, 5)
    y = randn(5, 3).t()
    check(lambda x, y: x * y - y.exp(), x, y)


# ---------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=str)
def test_dtypes(dtype):
    x, y = randn(5, 7, dtype=dtype), randn(7, dtype=dtype)
    compiled = check(lambda x, y: torch.sigmoid(x * y + 1.5) * x - torch.exp(y) / 4.0, x, y)
    # a float64 reference of the same math, rounded once: the fused result
    # should be at least as close to it as the tolerance allows
    with torch.no_grad():
        got = compiled(x, y)
    ref64 = torch.sigmoid(x.double() * y.double() + 1.5) * x.double() - torch.exp(y.double()) / 4
    assert_matches(got, ref64.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs_mixed_with_float32(dtype):
    check(lambda x, y: (x * y).tanh(), randn(4, 6, dtype=dtype), randn(4, 6))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_unary_math(dtype):
    x = randn(64, dtype=dtype)
    check(lambda x: torch.erf(x) + torch.tanh(x) * torch.exp(-x * x), x)


# ---------------------------------------------------------------- arithmetic
@pytest.mark.parametrize("fn", [
    lambda x, y: x + y,
    lambda x, y: torch.add(x, y, alpha=2.5),
    lambda x, y: torch.add(x, 1.5, alpha=-2.0),
    lambda x, y: x - y,
    lambda x, y: torch.sub(x, y, alpha=0.25),
    lambda x, y: torch.sub(x, 3, alpha=2),
    lambda x, y: 1.0 - x,
    lambda x, y: torch.rsub(x, y, alpha=3.0),
    lambda x, y: x * y,
    lambda x, y: x * 0.75,
    lambda x, y: x / y,
    lambda x, y: x / 7,
    lambda x, y: 2.0 / x,
    lambda x, y: torch.div(x, y, rounding_mode="floor"),
    lambda x, y: torch.div(x, y, rounding_mode="trunc"),
    lambda x, y: torch.remainder(x, y),
    lambda x, y: torch.reciprocal(x),
    lambda x, y: -x,
    lambda x, y: torch.abs(x),
], ids=["add", "add_alpha", "add_scalar_alpha", "sub", "sub_alpha", "sub_scalar_alpha",
        "rsub_scalar", "rsub_alpha", "mul", "mul_scalar", "div", "div_scalar", "scalar_div",
        "div_floor", "div_trunc", "remainder", "reciprocal", "neg", "abs"])
def test_arithmetic(fn):
    x = randn(4, 6) * 3
    y = randn(6, low=0.25) * torch.where(torch.rand(6) > 0.5, 1.0, -1.0)
    check(fn, x, y)


@pytest.mark.parametrize("fn", [
    lambda x, y: x + y * 3,
    lambda x, y: torch.add(x, y, alpha=2),
    lambda x, y: x - 5,
    lambda x, y: x * y,
    lambda x, y: torch.remainder(x, y),
    lambda x, y: torch.remainder(x, -3),
    lambda x, y: x / y,                 # true division promotes to float32
    lambda x, y: torch.abs(x) + torch.neg(y),
], ids=["add", "add_alpha", "sub_scalar", "mul", "remainder", "remainder_scalar", "truediv",
        "abs_neg"])
def test_integer_arithmetic(fn):
    x = torch.randint(-20, 20, (3, 5))
    y = torch.randint(1, 6, (5,)) * torch.where(torch.rand(5) > 0.5, 1, -1)
    check(fn, x, y)


# ---------------------------------------------------------------- unary math
def test_exp_log_sqrt_rsqrt():
    x = randn(5, 6, low=0.05)
    check(lambda x: torch.exp(-x) + torch.log(x) + torch.sqrt(x) - torch.rsqrt(x), x)


def test_log_and_sqrt_of_negative_values_are_nan():
    x = randn(17)
    check(lambda x: torch.log(x) + torch.sqrt(x) * torch.rsqrt(x), x)


def test_exp_overflow_is_inf():
    x = torch.tensor([-200.0, -80.0, -1.0, 1.0, 80.0, 100.0, 200.0])
    check(lambda x: torch.exp(x), x)


def test_tanh_near_zero_elementwise():
    """Tiny arguments must keep full relative precision (no 1 - exp(-2x) cancellation)."""
    magnitudes = torch.logspace(-8, math.log10(0.6), 60)
    x = torch.cat([magnitudes, -magnitudes, torch.tensor([0.2999, 0.3, 0.3001, -0.3])])
    compiled = check(torch.tanh, x)
    with torch.no_grad():
        got = compiled(x)
    torch.testing.assert_close(got, torch.tanh(x), rtol=2e-6, atol=0)


def test_tanh_large_magnitudes():
    x = torch.tensor([-1000.0, -100.0, -30.0, -9.0, -4.5, -1.5, 1.5, 4.5, 9.0, 30.0, 100.0,
                      1000.0, float("inf"), float("-inf"), float("nan")])
    compiled = check(torch.tanh, x)
    with torch.no_grad():
        got = compiled(x)
    torch.testing.assert_close(got, torch.tanh(x), rtol=1e-6, atol=0, equal_nan=True)


def test_tanh_random():
    check(torch.tanh, randn(9, 11) * 4)


def test_sigmoid_including_saturation():
    x = torch.cat([randn(40) * 5, torch.tensor([-200.0, -90.0, -20.0, 20.0, 90.0, 200.0])])
    check(torch.sigmoid, x)


def test_erf():
    check(lambda x: torch.erf(x), randn(50) * 2.5)


def test_expm1_log1p_near_zero_elementwise():
    magnitudes = torch.logspace(-9, 0, 40)
    x = torch.cat([magnitudes, -magnitudes * 0.9])
    for fn in (torch.expm1, torch.log1p):
        compiled = check(fn, x)
        with torch.no_grad():
            got = compiled(x)
        torch.testing.assert_close(got, fn(x), rtol=2e-6, atol=0)


def test_expm1_log1p_random():
    check(lambda x: torch.expm1(x) * torch.log1p(x.abs()), randn(6, 7) * 3)


@pytest.mark.parametrize("exponent", [2, 3, 4, -1, -2, 0.5, -0.5, 0, 1, 5, -3, 2.5, -1.5,
                                      1 / 3, 6.0])
def test_pow_scalar_exponents_with_negative_bases(exponent):
    """Integer exponents give eager's signs for negative bases, others NaN."""
    x = randn(5, 8) * 2
    x[0, :4] = torch.tensor([-2.0, -0.5, 0.5, 2.0])
    check(lambda x: torch.pow(x, exponent), x)


def test_pow_tensor_exponent():
    x = randn(6, 7) * 2
    exponents = torch.randint(-3, 4, (7,)).float()
    exponents[::3] += 0.5       # non-integer exponents: NaN for negative bases
    check(lambda x, y: torch.pow(x, y), x, exponents)


def test_pow_scalar_base():
    check(lambda x: torch.pow(2.0, x) + torch.pow(0.5, x), randn(4, 5) * 3)


def test_floor_ceil_trunc_sign():
    check(lambda x: torch.floor(x) + torch.ceil(x) * 10 + torch.trunc(x) * 100
          + torch.sign(x) * 1000, randn(30) * 5)


def test_sin_cos_exp2_log2():
    check(lambda x: torch.sin(x) * torch.cos(x) + torch.exp2(x) - torch.log2(x.abs()),
          randn(5, 5, low=0.1))


# ---------------------------------------------------------------- where, comparisons, min/max
@pytest.mark.parametrize("op", ["eq", "ne", "lt", "le", "gt", "ge"])
def test_comparisons(op):
    compare = getattr(torch, op)
    x = torch.randint(-2, 3, (4, 5)).float()      # integer-valued: equal cases exist
    y = torch.randint(-2, 3, (5,)).float()
    check(lambda x, y: compare(x, y), x, y)
    check(lambda x: compare(x, 1.0), x)
    check(lambda x, y: compare(x, y), x.long(), y.long())


def test_logical_and_bitwise():
    x, y = randn(6, 5), randn(6, 5)
    check(lambda x, y: ((x > 0) & (y < 0.5)) | ((x < -0.3) ^ (y > 1)), x, y)
    check(lambda x, y: torch.logical_and(x > 0, y > 0) | torch.logical_not(x < y), x, y)
    a, b = torch.randint(0, 64, (4, 4)), torch.randint(0, 64, (4,))
    check(lambda a, b: (a & b) | (a ^ 5), a, b)


def test_isnan_isinf():
    x = randn(12)
    x[2], x[5], x[7] = float("nan"), float("inf"), float("-inf")
    check(lambda x: torch.isnan(x) | torch.isinf(x), x)


@pytest.mark.parametrize("fn", [
    lambda c, a, b: torch.where(c, a, b),
    lambda c, a, b: torch.where(c, a, 2.5),
    lambda c, a, b: torch.where(c, -1.0, b),
    lambda c, a, b: torch.where(c, a.exp(), b.sigmoid()),
    lambda c, a, b: torch.where(a > b, a, b),
], ids=["tensors", "scalar_other", "scalar_self", "fused_branches", "computed_condition"])
def test_where(fn):
    c = torch.rand(4, 5) > 0.5
    check(fn, c, randn(4, 1), randn(5))


def test_where_with_zero_dim_tensor():
    check(lambda c, a, s: torch.where(c, a, s), torch.rand(3, 4) > 0.5, randn(3, 4), randn())


@pytest.mark.parametrize("fn", [torch.maximum, torch.minimum], ids=["maximum", "minimum"])
def test_maximum_minimum_propagate_nan(fn):
    x, y = randn(4, 6), randn(4, 6)
    x[0, 1] = x[2, 3] = float("nan")
    y[1, 2] = y[2, 3] = float("nan")
    y[3, 0] = float("inf")
    check(fn, x, y)
    check(lambda x, y: fn(x, y), x, randn(6))


@pytest.mark.parametrize("fn", [
    lambda x: torch.clamp(x, -0.5, 0.75),
    lambda x: torch.clamp(x, min=-0.2),
    lambda x: torch.clamp(x, max=0.3),
    lambda x: torch.clamp_min(x, 0.1),
    lambda x: torch.clamp_max(x, -0.1),
    lambda x: torch.relu(x),
], ids=["both", "min", "max", "clamp_min", "clamp_max", "relu"])
def test_clamp_with_nan(fn):
    x = randn(5, 6)
    x[1, 1] = float("nan")
    check(fn, x)


def test_clamp_with_tensor_bounds():
    x, low, high = randn(4, 5), randn(5) - 1, randn(4, 1) + 1
    check(lambda x, low, high: torch.clamp(x, low, high), x, low, high)


# ---------------------------------------------------------------- casts
def bf16_rounding_cases() -> torch.Tensor:
    """float32 values where truncating to bfloat16 and rounding to nearest
    (ties to even) disagree: low 16 bits above, at and below 0x8000."""
    uppers = torch.tensor([0x3F80, 0x3F81, 0xBF80, 0xBF81, 0x4049, 0x404A], dtype=torch.int64)
    lows = torch.tensor([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=torch.int64)
    bits = (uppers[:, None] * 65536 + lows[None, :]).flatten()
    bits = torch.where(bits >= 2 ** 31, bits - 2 ** 32, bits).to(torch.int32)
    return torch.cat([bits.view(torch.float32), randn(200)])


def test_cast_to_bfloat16_rounds_to_nearest_even():
    x = bf16_rounding_cases()
    compiled = check(lambda x: x.to(torch.bfloat16), x)
    with torch.no_grad():
        got = compiled(x)
    assert torch.equal(got.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))


def test_cast_to_bfloat16_inside_a_kernel_rounds():
    """Math after a bf16 cast must see the rounded value, as eager does."""
    x = bf16_rounding_cases()
    compiled = check(lambda x: x.to(torch.bfloat16).to(torch.float32) * 3.0 + x, x)
    with torch.no_grad():
        got = compiled(x)
    assert torch.equal(got, x.to(torch.bfloat16).to(torch.float32) * 3.0 + x)


def test_cast_to_float16_inside_a_kernel_rounds():
    x = randn(100) * 10
    compiled = check(lambda x: x.to(torch.float16).to(torch.float32) - x, x)
    with torch.no_grad():
        got = compiled(x)
    assert torch.equal(got, x.to(torch.float16).to(torch.float32) - x)


@pytest.mark.parametrize("fn", [
    lambda x: x.to(torch.float16),
    lambda x: (x * 3).to(torch.int32),
    lambda x: (x * 3).to(torch.int64) + 1,
    lambda x: torch.floor(x).to(torch.bool),
    lambda x: (x > 0).to(torch.float32) * x,
    lambda x: (x > 0).to(torch.bfloat16),
    lambda x: x.to(torch.float64) * 2,
    lambda x: (x * 10).to(torch.int8).to(torch.float32) / 4,
], ids=["f16", "int32_truncates", "int64", "bool", "bool_to_float", "bool_to_bf16", "f64",
        "int8_roundtrip"])
def test_casts(fn):
    check(fn, randn(6, 7) * 2)


def test_casts_from_half_and_integers():
    check(lambda x: x.to(torch.float32) * 2, randn(5, 5, dtype=torch.bfloat16))
    check(lambda x: x.to(torch.bfloat16), randn(5, 5, dtype=torch.float16))
    check(lambda x: x.to(torch.float32) / 3, torch.randint(-100, 100, (5, 5)))


# ---------------------------------------------------------------- generators and fills
def test_arange():
    check(lambda x: torch.arange(12, dtype=torch.float32).view(3, 4) * x, randn(3, 4))
    check(lambda x: torch.arange(1, 25, 2, dtype=torch.float32) - x, randn(12))
    check(lambda x: torch.arange(5) + x, torch.randint(-9, 9, (5,)))
    check(lambda x: torch.arange(3, 17, 2), randn(2))


def test_full_and_friends():
    check(lambda x: torch.full((3, 4), 2.5) * x, randn(3, 4))
    check(lambda x: torch.full_like(x, -1.25) + x * torch.ones_like(x), randn(3, 4))
    check(lambda x: torch.zeros(3, 4) - x, randn(3, 4))
    check(lambda x: torch.full((2, 3), 7.0), randn(2))


# ---------------------------------------------------------------- backward kernels
@pytest.mark.parametrize("fn, shapes", [
    (lambda x, y: torch.tanh(x * y).sigmoid(), [(4, 5), (4, 5)]),
    (lambda x, y: torch.erf(x) * torch.exp(-y) + x / y, [(3, 6), (3, 6)]),
    (lambda x, y: torch.pow(x.abs() + 0.5, 2.5) - torch.log1p(y * y), [(5, 4), (5, 4)]),
    (lambda x, y: torch.where(x > y, torch.expm1(x), torch.sqrt(y * y + 1)), [(6,), (6,)]),
    (lambda x, y: torch.maximum(x, y).clamp(-0.5, 0.5) * x, [(2, 3, 4), (2, 3, 4)]),
], ids=["tanh_sigmoid", "erf_exp_div", "pow_log1p", "where", "maximum_clamp"])
def test_backward_kernels(fn, shapes):
    inputs = [randn(*shape) for shape in shapes]
    compiled = retrograd.compile(fn, executor="interpret")
    leaves = [x.clone().requires_grad_() for x in inputs]
    eager_leaves = [x.clone().requires_grad_() for x in inputs]
    out = compiled(*leaves)
    ref = fn(*eager_leaves)
    assert_matches(out.detach(), ref.detach())
    tangent = randn(*ref.shape)
    out.backward(tangent)
    ref.backward(tangent)
    for leaf, eager_leaf in zip(leaves, eager_leaves):
        assert_matches(leaf.grad, eager_leaf.grad)
    assert set(compiled.reports) == {"forward", "backward"}
    assert_ran_in_triton(compiled.reports["forward"])
    assert_ran_in_triton(compiled.reports["backward"])


def test_backward_in_bfloat16():
    fn = lambda x: torch.tanh(x * 2.0) * x   # noqa: E731
    x = randn(6, 5, dtype=torch.bfloat16)
    compiled = retrograd.compile(fn, executor="interpret")
    leaf, eager_leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
    compiled(leaf).sum().backward()
    fn(eager_leaf).sum().backward()
    assert_matches(leaf.grad, eager_leaf.grad)
    assert_ran_in_triton(compiled.reports["backward"])


# ---------------------------------------------------------------- generated source
def build(fn, *inputs):
    """The program and kernel sources of ``fn``, built pass by pass as the
    pipeline does (without AOTAutograd: ``fn`` must be a pure function)."""
    def tupled(*args):
        result = fn(*args)
        return result if isinstance(result, tuple) else (result,)
    gm = make_fx(tupled, tracing_mode="fake",
                 decomposition_table=decomposition_table(full_table=True))(*inputs)
    ctx = PassContext(Options(), Dumper(None, []), OpSupport(), "unit")
    cleanup.run(gm, ctx)
    program, _ = fusion.run(gm, ctx)
    buffer_reuse.run(program, ctx)
    sources, _ = generate_sources(program, interpreted=True)
    return program, sources


def long_chain(x, y):
    a = torch.tanh(x * 2.0 + 1.0).sigmoid()
    b = torch.erf(a) ** 3
    c = torch.log1p(torch.expm1(b).abs()) ** 2.5
    d = torch.maximum(c, y).clamp(-0.5, 0.9)
    return torch.where(d > 0.1, d, torch.full_like(d, 0.25)).rsqrt()


def test_a_chain_fuses_into_one_kernel_and_matches():
    x, y = randn(4, 8), randn(8)
    compiled = check(long_chain, x, y, kernels=1)
    kernels = compiled.reports["forward"]["kernels"]
    assert kernels["extern"] == 0 and kernels["views"] == 0
    assert kernels["pointwise_ops"] >= 12
    traffic = compiled.reports["forward"]["traffic"]
    # one pass over the data: read x and y, write the result, nothing in between
    assert traffic == {"bytes_read": (32 + 8) * 4, "bytes_written": 32 * 4}


def test_generated_source_filecheck():
    program, sources = build(long_chain, randn(4, 8), randn(8))
    [kernel] = program.kernels
    assert kernel.kind == "triton"
    assert list(sources) == [kernel.name]
    source = sources[kernel.name]
    header, body = source.split("@triton.jit\ndef " + kernel.name, 1)
    # the header names every fx node the kernel covers, in order, as a line of Python
    check_header = FileCheck()
    for node in kernel.nodes:
        check_header.check(f"    {node.name} = {node.target}(")
    check_header.run(header)
    # and the body computes each of them once, in the same order
    check_body = FileCheck()
    for node in kernel.nodes:
        check_body.check(f"    {node.name} = ")
    check_body.run(body)
    (FileCheck()
     .check("pid = tl.program_id(0)")
     .check("offsets = pid * BLOCK + tl.arange(0, BLOCK)")
     .check("mask = offsets < n_elements")
     .check("tl.load(").check("tl.store(").check("def launch(")
     .run(body))
    code = "\n".join(line.split("#")[0] for line in body.splitlines())
    for forbidden in ("tl.sigmoid", "tl.zeros", "libdevice", "tl.extra", "tl.math.tanh",
                      "tl.math.pow", "tl.math.log1p", "tl.math.expm1", "tl.sum", "**"):
        assert forbidden not in code, f"{forbidden!r} in generated code"
    for line in source.splitlines():
        if "tl.load(" in line or "tl.store(" in line:
            assert "mask=mask" in line, line
    assert source.count("tl.store(") == 1       # only the result leaves the kernel
    assert source.count("tl.load(") == 2        # x and y, once each
    assert all(name in source for name in ("_tanh", "_sigmoid", "_log1p", "_expm1", "_pow"))


def test_fills_are_literals_not_loads():
    program, sources = build(lambda x: torch.full_like(x, 3.0) * x + torch.zeros_like(x),
                             randn(3, 4))
    [kernel] = program.kernels
    [source] = sources.values()
    assert kernel.inputs == [program.inputs[0]]
    assert source.count("tl.load(") == 1
    assert "3.0" in source


def launch(program, sources, kernel, tensors: dict):
    module = load_module(write_source(kernel.name, sources[kernel.name]), interpreted=True)
    with interpreter_mode(True), numpy.errstate(all="ignore"):
        module.launch(*(tensors[name] for name in kernel.inputs + kernel.outputs))


def padded(shape, strides, pad: int, fill: float):
    """A view with ``shape`` and ``strides`` inside a buffer with ``pad``
    sentinel elements before and after it."""
    span = 1 + sum((size - 1) * stride for size, stride in zip(shape, strides))
    storage = torch.full((pad + span + pad,), fill)
    return storage, storage.as_strided(shape, strides, pad), span


@pytest.mark.parametrize("shape, transpose", [((3, 5), False), ((5, 3), True),
                                               ((257, 256), False)],
                         ids=["tail_masked", "strided_output", "two_programs"])
def test_kernel_writes_nothing_out_of_bounds(shape, transpose):
    """Launch a generated kernel on views into sentinel-padded buffers and check
    the padding survives (the interpreter does no bounds checking)."""
    sentinel = -12345.0
    fn = lambda x, y: (x * y).exp() + 1.0   # noqa: E731
    x = randn(*reversed(shape)).t() if transpose else randn(*shape)
    y = randn(shape[1])
    program, sources = build(fn, x, y)
    [kernel] = program.kernels
    buffers = program.buffers
    pad = 1 << 16 if math.prod(shape) > 1 << 16 else 64   # covers a whole unmasked block
    tensors = {}
    for name, value in zip(program.inputs, (x, y)):
        buffer = buffers[name]
        assert buffer.strides == value.stride()
        _, view, _ = padded(buffer.shape, buffer.strides, pad, float("nan"))
        view.copy_(value)
        tensors[name] = view
    [out_name] = kernel.outputs
    out_buffer = buffers[out_name]
    # eager keeps a transposed input's layout; the kernel must store through it
    assert out_buffer.strides == fn(x, y).stride()
    storage, out, span = padded(out_buffer.shape, out_buffer.strides, pad, sentinel)
    tensors[out_name] = out
    launch(program, sources, kernel, tensors)
    assert bool((storage[:pad] == sentinel).all()), "wrote before the output"
    assert bool((storage[pad + span:] == sentinel).all()), "wrote past the output"
    assert_matches(out, fn(x, y))
