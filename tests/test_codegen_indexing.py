"""Indexing, scatter and pooling kernels against eager PyTorch, under Triton's interpreter.

Each test compiles a small function with ``retrograd.compile``, runs it
forward and backward (random upstream gradients) and compares with eager on
float64 copies of the inputs: relative error under 1e-5 for float32, 1e-2
for bfloat16, exact for integer outputs. The reports must show these graphs
ran as Triton kernels: embedding, gather, index_select, cat, constant
padding, slice_scatter and select_scatter as pointwise lowerings; index_put,
scatter and scatter_add as copy-then-scatter kernels; pooling as its own
kernels; no extern op in either half.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import retrograd
from checks import check_against_eager



# ---------------------------------------------------------------- helpers



def check(fn, *inputs, grad: bool = True, extern_free=("forward", "backward"), **options):
    """``check_against_eager``, and no extern op in the ``extern_free`` halves."""
    compiled = check_against_eager(fn, *inputs, grad=grad, **options)
    wants = any(grad and x.is_floating_point() for x in inputs)
    for half in extern_free if wants else ("forward",):
        kernels = compiled.reports[half]["kernels"]
        assert kernels["extern_ops"] == {}, f"{half}: extern ops {kernels['extern_ops']}"
    assert compiled.reports["forward"]["kernels"]["triton"] >= 1
    return compiled


def covered_ops(dump_dir: Path, half: str) -> str:
    """The headers of one half's generated kernels: the fx nodes each covers."""
    files = sorted(dump_dir.glob(f"*-{half}/kernels/*.py"))
    assert files, f"no {half} kernels dumped under {dump_dir}"
    return "\n".join(path.read_text().split('"""')[1] for path in files)


def randn(*shape) -> torch.Tensor:
    return torch.randn(shape)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(7)


# ---------------------------------------------------------------- embedding
@pytest.mark.parametrize("ids", [
    torch.tensor([[1, 3, 3, 7], [0, 9, 3, 1]]),
    torch.tensor([4, 4, 4, 2]),
    torch.tensor([[[1, 2], [2, 8]], [[9, 1], [1, 1]]]),
], ids=["2d_repeats", "1d_repeats", "3d"])
def test_embedding_forward_backward(ids):
    """The backward is index_put(zeros, [ids], grad, accumulate=True) in Triton."""
    check(lambda w, i: F.embedding(i, w), randn(10, 6), ids)


def test_embedding_repeated_indices_accumulate():
    weight = randn(10, 6).requires_grad_()
    compiled = retrograd.compile(lambda w, i: F.embedding(i, w), executor="interpret")
    ids = torch.full((3, 4), 5)
    out = compiled(weight, ids)
    upstream = randn(3, 4, 6)
    out.backward(upstream)
    expected = torch.zeros(10, 6)
    expected[5] = upstream.sum((0, 1))
    torch.testing.assert_close(weight.grad, expected, rtol=1e-6, atol=1e-6)
    assert compiled.reports["backward"]["kernels"]["extern_ops"] == {}


def test_embedding_padding_idx_and_a_consumer():
    ids = torch.tensor([[1, 3, 3, 0], [0, 9, 3, 1]])
    check(lambda w, i: F.embedding(i, w, padding_idx=3), randn(10, 6), ids)
    check(lambda w, i: F.embedding(i, w).mean(1).tanh(), randn(10, 6), ids)


# ---------------------------------------------------------------- gather, index_select
@pytest.mark.parametrize("dim, index_shape", [(0, (3, 7)), (1, (5, 4)), (-1, (2, 9))])
def test_gather(dim, index_shape):
    size = (5, 7)[dim]
    check(lambda x, i: torch.gather(x, dim, i).exp(), randn(5, 7),
          torch.randint(0, size, index_shape))


def test_index_select_leading_dim():
    check(lambda x, i: torch.index_select(x, 0, i), randn(5, 7), torch.tensor([4, 0, 0, 2]))


@pytest.mark.parametrize("shape, dim", [((5, 7), 1), ((2, 7, 3), 1), ((2, 3, 7), -1)],
                         ids=["2d", "3d", "3d_last"])
def test_index_select_inner_dim(shape, dim):
    """The gradient is index_put(zeros, [None, index], grad, accumulate=True):
    the index tensor after full slices, scattered in Triton too."""
    check(lambda x, i: torch.index_select(x, dim, i) * 2, randn(*shape),
          torch.tensor([6, 1, 1, 3]))


# ---------------------------------------------------------------- cat
CATS = {
    "two_dim1": (lambda a, b: torch.cat([a, b], 1), [(3, 4), (3, 2)]),
    "three_computed": (lambda a, b, c: torch.cat([a.exp(), b * 2, c], -1).tanh(),
                       [(3, 4), (3, 2), (3, 5)]),
    "four_dim1": (lambda a, b, c, d: torch.cat([a, b, c, d], 1), [(3, 4), (3, 2), (3, 5), (3, 1)]),
    "dim0_computed": (lambda a, b: torch.cat([a, b.sin()], 0) * a.sum(), [(2, 4), (5, 4)]),
    "3d_dim1": (lambda a, b, c: torch.cat([a, b, c], 1), [(2, 3, 4), (2, 1, 4), (2, 2, 4)]),
    "3d_dim2": (lambda a, b: torch.cat([a, b.exp()], 2), [(2, 3, 4), (2, 3, 1)]),
}


@pytest.mark.parametrize("name", list(CATS))
def test_cat(name):
    fn, shapes = CATS[name]
    check(fn, *(randn(*shape) for shape in shapes))


def test_cat_of_non_contiguous_inputs():
    check(lambda a, b: torch.cat([a, b], 0), randn(4, 3).t(), randn(8, 8)[::3, ::2])


# ---------------------------------------------------------------- constant padding
@pytest.mark.parametrize("pad, value, shape", [
    ((1, 2, 3, 0), 0.0, (5, 7)),
    ((-1, 2, 0, -2), 0.0, (5, 7)),
    ((-2, -1), 0.0, (5, 7)),
    ((2, 2), 1.5, (5, 7)),
    ((1, 1, 1, 1, 1, 0), -0.5, (2, 3, 4)),
], ids=["positive", "negative_mixed", "negative", "value", "3d"])
def test_constant_pad(pad, value, shape):
    check(lambda x: F.pad(x, pad, value=value) * 3, randn(*shape))


# ---------------------------------------------------------------- slices, selects
@pytest.mark.parametrize("fn", [
    lambda x: x[:, 1:5] * 2,
    lambda x: x[1::2, ::3].exp(),
    lambda x: x[:-1, -3:].sin(),
    lambda x: (x[1:4] * x[:3]).sum(0),
], ids=["slice", "stepped", "negative", "overlapping"])
def test_slice_backward(fn):
    check(fn, randn(5, 7))


def test_slice_backward_is_a_slice_scatter_kernel(tmp_path):
    check(lambda x: x[:, 1:5] * 2, randn(5, 7), dump_dir=str(tmp_path))
    assert "aten.slice_scatter.default" in covered_ops(tmp_path, "backward")


@pytest.mark.parametrize("fn, shape", [
    (lambda x: x[2] * 3, (5, 7)),
    (lambda x: x[:, -1].exp(), (5, 7)),
    (lambda x: x[:, 1, :].sin() * x[:, 2, :], (3, 4, 5)),
], ids=["row", "last_column", "3d"])
def test_select_backward(fn, shape):
    check(fn, randn(*shape))


@pytest.mark.parametrize("fn, shapes", [
    (lambda x, s: torch.select_scatter(x, s, 1, 2), [(5, 7), (5,)]),
    (lambda x, s: torch.select_scatter(x.exp(), s * 2, 0, -1), [(5, 7), (7,)]),
    (lambda x, s: torch.slice_scatter(x, s, 1, 1, 7, 2), [(5, 7), (5, 3)]),
    (lambda x, s: torch.slice_scatter(x, s.tanh(), 0, 1, 3) * x, [(5, 7), (2, 7)]),
], ids=["select_scatter", "select_scatter_computed", "slice_scatter_step",
        "slice_scatter_computed"])
def test_scatter_views(fn, shapes):
    check(fn, *(randn(*shape) for shape in shapes))


# ---------------------------------------------------------------- scatter, scatter_add, index_put
def _unique_rows(rows: int, size: int, count: int) -> torch.Tensor:
    """Distinct positions per row (scatter with repeats has no defined winner)."""
    return torch.stack([torch.randperm(size)[:count] for _ in range(rows)])


def test_scatter_src():
    check(lambda x, i, s: torch.scatter(x, 1, i, s), randn(3, 6), _unique_rows(3, 6, 4),
          randn(3, 4))
    check(lambda x, i, s: torch.scatter(x, 0, i, s), randn(6, 3), _unique_rows(3, 6, 4).t(),
          randn(4, 3))


def test_scatter_value():
    check(lambda x, i: torch.scatter(x, 1, i, 2.5) * x, randn(3, 6), _unique_rows(3, 6, 2))


@pytest.mark.parametrize("dim", [0, 1])
def test_scatter_add_with_repeated_indices(dim):
    index = torch.randint(0, 3, (3, 4))   # valid on either dim of a (3, 5) self
    index[0, :2] = 1   # repeats on purpose
    check(lambda x, i, s: torch.scatter_add(x, dim, i, s).sin(), randn(3, 5), index,
          randn(3, 4))


def test_index_put_accumulate():
    index = torch.tensor([1, 1, 5, 1])
    check(lambda x, i, v: x.index_put((i,), v, accumulate=True), randn(6, 4), index,
          randn(4, 4), grad=False)
    check(lambda x, i, v: x.index_put((i,), v), randn(6, 4), torch.tensor([1, 0, 5]),
          randn(3, 4), grad=False)


@pytest.mark.parametrize("dim, self_shape, index_shape, values_shape", [
    (1, (3, 6), (4,), (3, 4)),
    (1, (3, 6, 2), (2, 2), (3, 2, 2, 2)),
    (2, (2, 3, 6), (3,), (2, 3, 3)),
], ids=["dim1", "dim1_2d_index", "dim2"])
def test_index_put_after_full_slices(dim, self_shape, index_shape, values_shape):
    """``x[:, index] += values``: the index tensor after ``dim`` full slices
    (negative indices allowed), repeated positions added up."""
    index = torch.randint(-self_shape[dim], self_shape[dim], index_shape)
    index.view(-1)[:2] = 1   # a repeat for sure
    check(lambda x, i, v: torch.ops.aten.index_put(x, [None] * dim + [i], v, True),
          randn(*self_shape), index, randn(*values_shape), grad=False)


# ---------------------------------------------------------------- pooling
POOLS = [  # kernel, stride, padding, ceil_mode
    (2, 2, 0, False), (3, 2, 1, False), (3, 1, 1, False), (2, 1, 0, False),
    (3, 2, 0, True), (2, 2, 1, True), (3, 3, 1, True),
]


@pytest.mark.parametrize("kernel, stride, padding, ceil_mode", POOLS,
                         ids=lambda v: str(v))
def test_max_pool2d(kernel, stride, padding, ceil_mode):
    check(lambda x: F.max_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode),
          randn(2, 3, 9, 10))


@pytest.mark.parametrize("kernel, stride, padding, ceil_mode", POOLS,
                         ids=lambda v: str(v))
@pytest.mark.parametrize("count_include_pad", [True, False], ids=["include_pad", "exclude_pad"])
def test_avg_pool2d(kernel, stride, padding, ceil_mode, count_include_pad):
    check(lambda x: F.avg_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode,
                                 count_include_pad=count_include_pad), randn(2, 3, 9, 10))


def test_pooling_variants():
    x = randn(2, 3, 9, 10)
    check(lambda x: F.max_pool2d(x, 2, 1, 0, dilation=2), x)
    check(lambda x: F.max_pool2d(x, 2), x.permute(0, 1, 3, 2))   # non-contiguous
    check(lambda x: F.max_pool2d(x, 3, 2, 1), x[0])                # no batch dim
    check(lambda x: F.avg_pool2d(x, 3, 2, 1, divisor_override=5), x)
    check(lambda x: F.max_pool2d(x, 3, 2, 1, return_indices=True), x, grad=False)


def test_max_pool2d_ties_and_nan():
    """Ties: the first maximum in the window gets the gradient; NaN wins, as in torch."""
    check(lambda x: F.max_pool2d(x, 3, 2, 1), torch.randint(0, 3, (2, 3, 9, 10)).float())
    x = randn(2, 3, 8, 8)
    x[0, 1, 2, 3] = float("nan")
    check(lambda x: F.max_pool2d(x, 2, return_indices=True), x, grad=False)


@pytest.mark.parametrize("pool", [lambda x: F.max_pool2d(x, 2),
                                  lambda x: F.avg_pool2d(x, 3, 2, 1)], ids=["max", "avg"])
def test_pooling_bfloat16(pool):
    check(pool, randn(2, 3, 8, 8).bfloat16())
