"""Generated reduction kernels against eager PyTorch, under Triton's interpreter.

Every test compiles a small function with ``retrograd.compile`` (capture,
passes, codegen, interpreter), runs it forward and, where the inputs are
floating, backward with random upstream gradients, and compares with eager
PyTorch evaluated on float64 copies of the same inputs. Tolerances follow
../shared/DESIGN.md: relative error ``||got - ref|| / ||ref||`` under 1e-5 for
float32 (1e-4 for sums over tens of thousands of elements), 1e-2 for
float16/bfloat16; NaN and inf where eager has them; integers, booleans and
indices exact. Reports must show the reductions ran as Triton kernels.

The looped tests use a reduced extent above 16384: the interpreter caps a
reduction block (RBLOCK) at 2**14 elements, so the kernel walks the extent in
several blocks, the last one partly masked. They keep to one or two rows: the
lanes of a row block are combined at the end, and on the interpreter a
``tl.reduce`` with a combine function of our own (prod's) calls it once per
lane in Python.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import retrograd

from checks import check_against_eager as check

LONG = 1e-4          # float32 sums over a looped extent
EXTENT = 20000       # > 2**14: several RBLOCK steps on the interpreter


# ---------------------------------------------------------------- helpers






def assert_triton(compiled, halves=("forward", "backward"), kernels: int | None = None) -> None:
    """No extern op in the given halves; ``kernels`` Triton kernels in the forward."""
    for half in halves:
        report = compiled.reports[half]["kernels"]
        assert report["extern_ops"] == {}, f"{half}: extern ops {report['extern_ops']}"
    if kernels is not None:
        forward = compiled.reports["forward"]["kernels"]
        assert forward["triton"] == kernels and forward["extern"] == 0, forward


def kernel_sources(dump_dir: Path, half: str = "forward") -> list[str]:
    """The generated Triton sources of one half, from a dump folder."""
    files = sorted(dump_dir.glob(f"*-{half}/kernels/*.py"))
    assert files, f"no {half} kernels dumped under {dump_dir}"
    return [path.read_text() for path in files]


def randn(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape).to(dtype)


def away_from_zero(*shape) -> torch.Tensor:
    """Random signs, magnitudes in [0.5, 1.5): products neither vanish nor blow up."""
    sign = torch.where(torch.rand(shape) < 0.5, -1.0, 1.0)
    return sign * (torch.rand(shape) + 0.5)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(2024)


# ---------------------------------------------------------------- dims, keepdim, ops
DIMS = [(-1,), (0,), (0, 2)]


def _reduce(op: str, dims, keepdim: bool):
    if dims is None:
        return lambda x: getattr(torch, op)(x)
    return lambda x: getattr(torch, op)(x, dims, keepdim=keepdim)


@pytest.mark.parametrize("op", ["sum", "mean", "amax", "amin", "var", "std"])
@pytest.mark.parametrize("dims, keepdim", [(d, k) for d in DIMS for k in (False, True)]
                         + [(None, False)],
                         ids=lambda v: str(v).replace(" ", ""))
def test_reduction_forward_backward(op, dims, keepdim):
    compiled = check(_reduce(op, dims, keepdim), randn(6, 7, 5))
    assert_triton(compiled, kernels=1)


@pytest.mark.parametrize("dim, keepdim", [(-1, False), (0, True), (1, False), (None, False)])
def test_prod(dim, keepdim):
    fn = (lambda x: torch.prod(x)) if dim is None else \
        (lambda x: torch.prod(x, dim, keepdim=keepdim))
    x = away_from_zero(4, 6, 5) if dim is not None else away_from_zero(3, 7)
    compiled = check(fn, x)
    # prod's gradient is built from cumprods of x (extern ops by design), which
    # the partitioner may place in either half; nothing else runs outside Triton
    for half in ("forward", "backward"):
        extern = compiled.reports[half]["kernels"]["extern_ops"]
        assert set(extern) <= {"aten.cumprod.default", "aten.flip.default"}, extern
    assert_triton(check(fn, x, grad=False), halves=("forward",), kernels=1)


@pytest.mark.parametrize("op", ["argmax", "argmin"])
@pytest.mark.parametrize("dim, keepdim", [(-1, False), (0, True), (1, False), (None, False)])
def test_argmax_argmin(op, dim, keepdim):
    fn = (lambda x: getattr(torch, op)(x)) if dim is None else \
        (lambda x: getattr(torch, op)(x, dim, keepdim=keepdim))
    compiled = check(fn, randn(6, 7, 5), grad=False)
    check(fn, torch.randint(-50, 50, (6, 7, 5)), grad=False)
    assert_triton(compiled, halves=("forward",), kernels=1)


@pytest.mark.parametrize("op", ["max", "min"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.bool])
@pytest.mark.parametrize("keepdim", [False, True])
def test_max_min_dim_values_and_indices(op, dtype, keepdim):
    """``max.dim``/``min.dim`` (a tuple: values and indices) are one reduction
    kernel: ties take the first index, a NaN wins with its first index, bool
    inputs (cumprod's backward) work; the values' gradient too."""
    x = (torch.randn(4, 7) * 2).round().to(dtype) if dtype != torch.bool \
        else torch.randn(4, 7) > 0.5
    if dtype == torch.float32:
        x[2, 3] = x[2, 5] = float("nan")
    compiled = check(lambda x: tuple(getattr(torch, op)(x, 1, keepdim)), x)
    assert_triton(compiled, halves=("forward",), kernels=1)


@pytest.mark.parametrize("op", ["any", "all"])
@pytest.mark.parametrize("dims", [-1, 0, (0, 2), None], ids=str)
def test_any_all(op, dims):
    def fn(x):
        return getattr(torch, op)(x) if dims is None else getattr(torch, op)(x, dims)
    x = randn(6, 7, 5)
    # thresholds that leave some rows all-true, some all-false and some mixed
    threshold = 1.6 if op == "any" else -1.6
    compare = (lambda x: x > threshold)
    compiled = check(lambda x: fn(compare(x)), x, grad=False)
    assert_triton(compiled, halves=("forward",), kernels=1)
    check(fn, (x > threshold).to(torch.int32), grad=False)
    check(fn, (x > threshold).float() * x, grad=False)


@pytest.mark.parametrize("dims, correction, keepdim", [
    (-1, 1, False), (0, 0, True), ((0, 2), 1, False), ((0, 2), 2, True), (None, 1, False)],
    ids=lambda v: str(v).replace(" ", ""))
def test_var_mean(dims, correction, keepdim):
    compiled = check(lambda x: torch.var_mean(x, dims, correction=correction, keepdim=keepdim),
                     randn(6, 7, 5))
    assert_triton(compiled, kernels=1)


@pytest.mark.parametrize("correction", [0, 2])
def test_std_correction(correction):
    compiled = check(lambda x: torch.std(x, (0, 2), correction=correction), randn(6, 7, 5))
    assert_triton(compiled, kernels=1)


def test_welford_is_stable_for_a_large_mean():
    """A mean 10^4 times the spread: E[x^2] - E[x]^2 in float32 is all rounding
    error there; Welford's update keeps float32 accuracy."""
    x = torch.randn(4, 512) + 1e4
    compiled = check(lambda x: torch.var_mean(x, -1), x, grad=False)
    assert_triton(compiled, halves=("forward",), kernels=1)


def test_integer_and_bool_sums():
    check(lambda x: x.sum(1), torch.randint(-9, 9, (4, 6)), grad=False)
    check(lambda x: (x > 0).sum(0), randn(5, 6), grad=False)
    check(lambda x: x.amax(-1), torch.randint(-9, 9, (4, 6)), grad=False)


# ---------------------------------------------------------------- layouts
LAYOUTS = {
    "transposed": lambda: randn(7, 6).t(),
    "sliced": lambda: randn(8, 12)[1::2, ::3],
    "permuted": lambda: randn(2, 3, 4, 5).permute(0, 3, 1, 2)[:, :, 1],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_non_contiguous_inputs(layout):
    x = LAYOUTS[layout]()
    assert not x.is_contiguous()
    compiled = check(lambda x: (x.sum(0), x.mean(-1), x.amax(-1, keepdim=True), x.var(0),
                                x.std((0, 1)), x.argmax(-1)), x)
    assert_triton(compiled)


def test_leading_dim_reductions():
    """Reductions over the outer dims, as a bias gradient is."""
    x = randn(64, 12)
    assert_triton(check(lambda x: (x.sum(0), x.mean(0, keepdim=True), x.amax(0)), x))
    assert_triton(check(lambda x: x.sum((0, 1)), randn(4, 8, 16)))


def test_bias_gradient():
    """The bias gradient is a sum over leading dims of a fused pointwise product."""
    compiled = check(lambda x, b: torch.tanh(x + b), randn(4, 8, 16), randn(16))
    assert_triton(compiled)


# ---------------------------------------------------------------- NaN, inf, ties
def _with_nans() -> torch.Tensor:
    x = randn(5, 9)
    x[1, 3] = float("nan")
    x[3, 0] = x[3, 7] = float("nan")
    x[4] = float("-inf")
    x[0, 2] = float("inf")
    return x


@pytest.mark.parametrize("fn", [
    lambda x: x.amax(-1), lambda x: x.amin(-1), lambda x: x.amax(0),
    lambda x: x.argmax(-1), lambda x: x.argmin(-1), lambda x: x.argmax(0),
    lambda x: x.argmin(0), lambda x: x.max(), lambda x: x.min(), lambda x: x.argmax(),
    lambda x: x.sum(-1),
], ids=["amax", "amin", "amax0", "argmax", "argmin", "argmax0", "argmin0", "max", "min",
        "argmax_all", "sum"])
def test_nan_propagation(fn):
    """NaN wins in max/min and their indices (the first NaN), as in torch."""
    check(fn, _with_nans(), grad=False)


@pytest.mark.parametrize("fn", [
    lambda x: x.argmax(-1), lambda x: x.argmin(-1), lambda x: x.argmax(0),
    lambda x: x.argmin(0), lambda x: x.argmax(),
], ids=["argmax", "argmin", "argmax0", "argmin0", "argmax_all"])
def test_ties_take_the_first_index(fn):
    x = torch.randint(0, 3, (6, 10)).float()
    check(fn, x, grad=False)
    check(fn, torch.full((3, 5), float("-inf")), grad=False)


def test_amax_gradient_is_shared_between_ties():
    x = torch.randint(0, 4, (6, 10)).float() + 0.25
    assert_triton(check(lambda x: (x.amax(-1), x.amin(0)), x))


# ---------------------------------------------------------------- half precision
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["sum", "mean", "amax", "var", "std", "prod", "var_mean",
                                "argmax"])
def test_half_precision(dtype, op):
    if op == "prod":
        x, fn = away_from_zero(6, 20).to(dtype), lambda x: torch.prod(x, -1)
    else:
        x, fn = (torch.randn(6, 300) * 3 + 1).to(dtype), lambda x: getattr(torch, op)(x, -1)
    compiled = check(fn, x, grad=op != "argmax")
    if op != "prod":   # prod's gradient needs cumprod, an extern op (see test_prod)
        assert_triton(compiled, halves=("forward",), kernels=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_accumulates_in_float32(dtype):
    """4096 values near 1: accumulated in the half type the running sum stalls
    (its spacing passes 1 at 2048 for float16, 256 for bfloat16)."""
    x = (1.0 + torch.rand(2, 4096) / 64).to(dtype)
    check(lambda x: x.sum(-1), x, grad=False, tolerance=4e-3)
    check(lambda x: x.mean(-1), x, grad=False, tolerance=4e-3)
    compiled = check(lambda x: x.sum(-1, dtype=torch.float32), x, grad=False)
    assert_triton(compiled, halves=("forward",), kernels=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_softmax_and_layer_norm(dtype):
    x = (torch.randn(8, 64) * 2).to(dtype)
    assert_triton(check(lambda x: torch.softmax(x, -1), x), kernels=1)
    w, b = (torch.rand(64) + 0.5).to(dtype), torch.randn(64).to(dtype)
    assert_triton(check(lambda x, w, b: F.layer_norm(x, (64,), w, b), x, w, b), kernels=1)


# ---------------------------------------------------------------- fused patterns
def test_softmax_is_one_kernel():
    compiled = check(lambda x: torch.softmax(x, -1), randn(6, 33))
    assert_triton(compiled, kernels=1)
    compiled = check(lambda x: torch.softmax(x, 0), randn(6, 33))
    assert_triton(compiled, kernels=1)


def test_log_softmax_is_one_kernel():
    compiled = check(lambda x: F.log_softmax(x, -1), randn(6, 33))
    assert_triton(compiled, kernels=1)


def test_layer_norm_is_one_kernel_and_its_backward_has_no_extern_op():
    x, w, b = randn(6, 33), torch.rand(33) + 0.5, randn(33)
    compiled = check(lambda x, w, b: F.layer_norm(x, (33,), w, b), x, w, b)
    assert_triton(compiled, kernels=1)
    compiled = check(lambda x: F.layer_norm(x, (33,)), x)
    assert_triton(compiled, kernels=1)


def _column_kernels(sources: list[str], dims: str) -> list[str]:
    return [source for source in sources if f"Reduces dims {dims} of shape" in source]


@pytest.mark.parametrize("shape", [(7, 5), (2, 3, 5)])
def test_layer_norm_weight_and_bias_gradients_are_one_kernel(shape, tmp_path):
    """``sum(grad * xhat)`` and ``sum(grad)`` over the leading dims: one kernel
    computing the product where it sums it (the product moves out of the
    norm's row kernel), reading ``grad`` once; the row kernel stores no product
    for it. Were two kernels, the product stored and read back."""
    x, w, b = randn(*shape), torch.rand(5) + 0.5, randn(5)
    check(lambda x, w, b: F.layer_norm(x, (5,), w, b), x, w, b, dump_dir=str(tmp_path))
    sources = kernel_sources(tmp_path, "backward")
    dims = str(list(range(len(shape) - 1)))
    (column,) = _column_kernels(sources, dims)
    assert "2 reductions and 1 other ops" in column
    assert column.count("tl.load(") == 2   # grad and xhat, each once
    rows = [source for source in sources if source not in _column_kernels(sources, dims)]
    assert sum(source.count("tl.store(") for source in rows) <= 3   # grad x, xhat, rstd


def test_a_product_of_two_row_kernel_values_stays_in_its_kernel(tmp_path):
    """Moving ``s * exp(s)`` of a softmax into the column sum would make the
    softmax kernel store two values instead of one: it stays."""
    def fn(x):
        s = torch.softmax(x, -1)
        return (s * s.exp()).sum(0)
    compiled = check(fn, randn(7, 5), dump_dir=str(tmp_path))
    assert_triton(compiled)
    (column,) = _column_kernels(kernel_sources(tmp_path), "[0]")
    assert "1 reductions and 0 other ops" in column


@pytest.mark.parametrize("name", ["attention_block", "gpt2_tiny"])
def test_zoo_layer_norm_parameter_gradients_are_one_kernel_each(name, monkeypatch):
    """On the zoo's layer-norm models: one column-sum kernel per LayerNorm in
    the backward (were two), and gradients as eager's. The fx executor runs the
    Program (the kernels' numerics under the interpreter: test_models)."""
    from zoo import ZOO, assert_parity, training_step
    from retrograd.passes import fusion
    programs = []
    original = fusion.run

    def recording(gm, ctx):
        result = original(gm, ctx)
        programs.append(result.subject)
        return result
    monkeypatch.setattr(fusion, "run", recording)
    entry = ZOO[name]
    model, inputs = entry.model(), entry.inputs()
    reference = copy.deepcopy(model)
    expected = training_step(entry, reference, reference, inputs)
    got = training_step(entry, retrograd.compile(model, executor="fx"), model, inputs)
    assert_parity(got, expected)
    (backward,) = [p for p in programs if p.name.endswith("-backward")]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    columns = [k for k in backward.kernels if k.is_reduction and len(k.full_shape) == 3
               and k.reduced_dims == (0, 1)]
    assert len(columns) == len(norms)
    for kernel in columns:
        sums = [n for n in kernel.nodes if n.target is torch.ops.aten.sum.dim_IntList]
        assert len(sums) == 2, kernel.name


def test_rms_norm_is_one_kernel():
    def rms_norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    compiled = check(rms_norm, randn(6, 33), torch.rand(33) + 0.5)
    assert_triton(compiled, kernels=1)


@pytest.mark.parametrize("reduction, label_smoothing", [
    ("mean", 0.0), ("sum", 0.1), ("none", 0.0)])
def test_cross_entropy_has_no_extern_op(reduction, label_smoothing):
    target = torch.randint(0, 33, (6,))
    target[2] = -100 if reduction == "mean" else target[2]   # ignore_index
    compiled = check(lambda x, t: F.cross_entropy(x, t, reduction=reduction,
                                                  label_smoothing=label_smoothing),
                     randn(6, 33), target)
    assert_triton(compiled)


# ---------------------------------------------------------------- looped reductions
def test_looped_sum_rows(tmp_path):
    x = randn(2, EXTENT)
    compiled = check(lambda x: x.sum(-1), x, tolerance=LONG, dump_dir=str(tmp_path))
    assert_triton(compiled, kernels=1)
    (source,) = kernel_sources(tmp_path)
    assert f"for k_start in range(0, {EXTENT}, RBLOCK)" in source
    assert "RBLOCK=16384" in source   # so the loop runs twice, the second block masked


def test_looped_mean_over_the_leading_dim():
    compiled = check(lambda x: x.mean(0), randn(EXTENT, 2), tolerance=LONG)
    assert_triton(compiled, kernels=1)


def test_looped_max_argmax_nan_and_ties():
    """Row 0: a NaN in the second block; row 1: its maximum tied between the
    first and the second block (the first index wins)."""
    x = randn(2, EXTENT)
    x[0, 17000] = float("nan")
    x[1, 100] = x[1, 18000] = 10.0
    compiled = check(lambda x: (x.amax(-1), x.argmax(-1)), x, grad=False)
    assert_triton(compiled, halves=("forward",))


def test_looped_amax_backward():
    x = randn(1, EXTENT)
    x[0, 19999] = 10.0   # the maximum in the last, partly masked block
    assert_triton(check(lambda x: x.amax(-1), x, tolerance=LONG), kernels=1)


def test_looped_var_mean_uses_welford(tmp_path):
    x = randn(1, EXTENT) * 2 + 3
    compiled = check(lambda x: torch.var_mean(x, -1), x, tolerance=LONG,
                     grad_tolerance=LONG, dump_dir=str(tmp_path))
    assert_triton(compiled, kernels=1)
    (source,) = kernel_sources(tmp_path)
    assert f"for k_start in range(0, {EXTENT}, RBLOCK)" in source
    # Welford's update per lane: (mean, M2, count) moved by each element's delta
    assert re.search(r"(\w+)_mean = \1_mean \+ delta / ", source), source
    assert re.search(r"(\w+)_m2 = \1_m2 \+ delta \* ", source), source
    # then the lanes merged pairwise (Chan et al.) or all at once around the row mean
    assert "_welford_combine" in source or re.search(
        r"_count \* \((\w+)_lane_mean - \w+_mean\)", source), source


def test_looped_prod_and_any():
    x = 1 + (torch.rand(1, EXTENT) - 0.5) * 1e-3
    check(lambda x: x.prod(-1), x, grad=False, tolerance=LONG)
    y = randn(1, EXTENT)
    y[0, 19000] = 9.0    # the only element over 8, in the second block
    check(lambda y: (y > 8).any(-1), y, grad=False)


def test_looped_softmax(tmp_path):
    """Two walks over the extent: the max and the sum of exponentials together
    (online softmax, codegen/online_softmax.py), then the store (was three)."""
    compiled = check(lambda x: torch.softmax(x, -1), randn(1, EXTENT), tolerance=LONG,
                     grad_tolerance=LONG, dump_dir=str(tmp_path))
    assert_triton(compiled, kernels=1)
    (source,) = kernel_sources(tmp_path)
    assert source.count("for k_start in range") == 2
    assert "new running max" in source


@pytest.mark.parametrize("fn", [
    lambda x: F.log_softmax(x * 3, -1),
    lambda x: torch.logsumexp(x, -1),
    lambda x: F.cross_entropy(x, torch.tensor([5, 19001])),
], ids=["log_softmax", "logsumexp", "cross_entropy"])
def test_online_softmax_patterns(fn):
    """Rows growing in value across the blocks (the running max moves, the
    running sum is rescaled)."""
    x = randn(2, EXTENT) + torch.linspace(0, 30, EXTENT)
    compiled = check(fn, x, tolerance=LONG, grad_tolerance=LONG)
    assert_triton(compiled, halves=("forward",))


def test_online_softmax_infinities_and_nan():
    x = randn(3, EXTENT)
    x[0, :] = float("-inf")          # every lane -inf: NaN, as eager
    x[1, 18000] = float("inf")       # one inf: NaN around it, as eager
    x[2, 17000] = float("nan")
    check(lambda x: torch.softmax(x, -1), x, grad=False)
    y = randn(2, EXTENT)
    y[0, :17000] = float("-inf")     # whole blocks of -inf, then finite values
    check(lambda y: torch.softmax(y, -1), y, grad=False, tolerance=LONG)


# ---------------------------------------------------------------- strategies by shape
def test_persistent_softmax_loads_its_row_once(tmp_path):
    """The row fits one block: no loop; the max, the sum of exponentials and
    the store reuse the row and ``exp(x - max)`` held in registers."""
    compiled = check(lambda x: torch.softmax(x, -1), randn(6, 33), dump_dir=str(tmp_path))
    assert_triton(compiled, kernels=1)
    (source,) = kernel_sources(tmp_path)
    assert "for k_start" not in source
    assert source.count("tl.load(") == 1
    assert source.count("tl.exp(") == 1


def test_persistent_layer_norm_backward_reads_each_input_once(tmp_path):
    x, w, b = randn(6, 33), torch.rand(33) + 0.5, randn(33)
    check(lambda x, w, b: F.layer_norm(x, (33,), w, b), x, w, b, dump_dir=str(tmp_path))
    for source in kernel_sources(tmp_path, "backward"):
        loads = re.findall(r"tl\.load\((\w+)_ptr \+ ([^,]+),", source)
        assert len(loads) == len(set(loads)), loads


def test_sibling_reductions_over_one_input_are_one_kernel(tmp_path):
    """Three reductions of the same input and geometry (the second and third
    read it from memory, not from the first's kernel) share one kernel, which
    loads the input once per step."""
    compiled = check(lambda x: (x.mean(0) * 2 + x.amax(0), x.amin(0, keepdim=True)),
                     randn(9, 5), dump_dir=str(tmp_path))
    assert_triton(compiled, kernels=1)
    (source,) = kernel_sources(tmp_path)
    assert source.count("tl.load(") == 1


@pytest.fixture
def forced_split(monkeypatch):
    """Split every splittable reduction into 3 chunks of 2 blocks of 8 (on the
    interpreter the chooser never splits: each program instance costs ~1.5 ms)."""
    from retrograd.codegen import reduction
    monkeypatch.setattr(reduction, "choose_reduction_blocks",
                        lambda rows, extent, interpreted, inner=True: (4, 8))
    monkeypatch.setattr(reduction, "choose_split", lambda *args: 3)


@pytest.mark.parametrize("fn, shape", [
    (lambda x: x.sum(0), (37, 5)),
    (lambda x: (x.mean(0) * 2 + x.amax(0), x.amin(0, keepdim=True)), (37, 5)),
    (lambda x: x.sum((0, 1)), (13, 3, 5)),
    (lambda x: torch.softmax(x, -1).sum(0), (37, 5)),
], ids=["bias_gradient", "siblings_with_epilogue", "two_leading_dims", "after_softmax"])
def test_split_reduction(forced_split, fn, shape, tmp_path):
    """Partials per (row block, chunk), then the combination: as eager, forward
    and backward, with rows and extent not multiples of the blocks."""
    compiled = check(fn, randn(*shape), dump_dir=str(tmp_path))
    assert_triton(compiled)
    sources = kernel_sources(tmp_path)
    assert any("split into 3 chunks" in source for source in sources), sources


def test_split_reduction_keeps_nan_and_infinity(forced_split):
    x = randn(37, 5)
    x[30, 1], x[3, 2], x[20, 3] = float("nan"), float("inf"), float("-inf")
    check(lambda x: (x.amax(0), x.amin(0), x.sum(0)), x, grad=False)


def test_layer_norm_weight_and_bias_gradients_split(forced_split, tmp_path):
    """Both column sums split in one pair of kernels (one partials tensor each)."""
    x, w, b = randn(37, 5), torch.rand(5) + 0.5, randn(5)
    check(lambda x, w, b: F.layer_norm(x, (5,), w, b), x, w, b, dump_dir=str(tmp_path))
    (split,) = [s for s in kernel_sources(tmp_path, "backward") if "split into" in s]
    assert "2 split reductions" in split


@pytest.mark.parametrize("disable", [(), ("buffer_reuse",)], ids=["planned", "unplanned"])
def test_split_partials_are_an_arena_slot(forced_split, disable, tmp_path):
    """The partials are a planned temporary, alive while the split kernel runs:
    the report's arena and live peak count them beside the softmax they are
    written while reading, and ``launch`` allocates nothing. Without the memory
    plan, ``launch`` allocates them itself (as it did for every split before)."""
    compiled = check(lambda x: torch.softmax(x, -1).sum(0) * 2, randn(37, 5), grad=False,
                     dump_dir=str(tmp_path), disable=list(disable))
    (split,) = [s for s in kernel_sources(tmp_path) if "split into 3 chunks" in s]
    assert ("torch.empty" in split) == bool(disable)
    if disable:
        return
    forward = compiled.reports["forward"]
    (stats,) = [p["stats"] for p in forward["passes"] if p["name"] == "buffer_reuse"]
    assert stats["scratch_buffers"] == 1
    softmax, partials = 37 * 5 * 4, 3 * 5 * 4
    assert forward["memory"]["live_lower_bound_bytes"] >= softmax + partials
    assert forward["memory"]["arena_bytes"] >= softmax + partials


def test_split_partials_under_verify(forced_split):
    """``verify=True`` runs each pass's Program node by node: the partials
    (outputs no node makes) are skipped there, not looked up."""
    check(lambda x: x.sum(0) * 2, randn(37, 5), grad=False, verify=True)


def test_split_is_chosen_by_shape():
    """On a GPU: a bias gradient over many tokens splits, many rows or a short
    extent do not; the interpreter never splits."""
    from retrograd.codegen.reduction import choose_reduction_blocks, choose_split

    def split(rows, extent, interpreted=False, inner=False):
        return choose_split(rows, extent, interpreted,
                            *choose_reduction_blocks(rows, extent, interpreted, inner))
    assert split(768, 8192 * 4) > 1        # bias gradient: 768 features, 32k tokens
    assert split(64, 4096) > 1
    assert split(768, 8192 * 4, interpreted=True) == 1
    assert split(50000, 8192) == 1         # enough rows to fill the GPU
    assert split(768, 64) == 1             # short extent: one pass is enough
    assert split(8, 1024, inner=True) == 1


def test_var_mean_beside_a_sibling_reduction():
    """var_mean's value is a tuple: it never joins a sibling (fusion crashed
    on its shape)."""
    check(lambda x: (x.sum(0), *torch.var_mean(x, 0)), randn(9, 5))
