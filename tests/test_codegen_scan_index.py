"""Scans (cumsum, cumprod), flip and advanced indexing (aten.index) as Triton kernels.

Each test compiles a small function with ``retrograd.compile``, runs it
forward and backward under Triton's interpreter and compares with eager
PyTorch on float64 copies (``checks.check_against_eager``), then checks the
reports: no extern op in either half. ``cumsum`` and ``cumprod`` become scan
kernels (``codegen/scan.py``), ``flip`` and ``aten.index`` pointwise
lowerings with computed addresses (``codegen/indexing.py``), and the
gradient of advanced indexing, an ``index_put`` with several index tensors,
a scatter kernel (``codegen/scatter.py``). Shapes stay tiny: one or two
program instances per launch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checks import assert_close_floor, check_against_eager, recording_graphs

aten = torch.ops.aten


def check(fn, *inputs, grad: bool = True, allowed=(), **options):
    """``check_against_eager`` and no extern op but ``allowed`` in the halves that exist."""
    compiled = check_against_eager(fn, *inputs, grad=grad, **options)
    halves = ("forward", "backward") if grad and any(
        x.is_floating_point() for x in inputs) else ("forward",)
    for half in halves:
        kernels = compiled.reports[half]["kernels"]
        extern = set(kernels["extern_ops"]) - set(allowed)
        assert not extern, f"{half}: extern ops {kernels['extern_ops']}"
    return compiled


def kernel_files(dump_dir: Path, half: str) -> list[Path]:
    files = sorted(dump_dir.glob(f"*-{half}/kernels/*.py"))
    assert files, f"no {half} kernels under {dump_dir}"
    return files


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(13)


# ---------------------------------------------------------------- scans
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_cumsum_forward_backward(dim):
    """The backward is flip, cumsum, flip: all three in Triton."""
    check(lambda x: torch.cumsum(x, dim) * 2, torch.randn(3, 5, 4))


def test_cumsum_is_a_scan_kernel(tmp_path):
    check(lambda x: x.cumsum(1), torch.randn(4, 6), dump_dir=str(tmp_path))
    (source,) = [p.read_text() for p in kernel_files(tmp_path, "forward")]
    assert "tl.associative_scan(block, 1, tl.standard._sum_combine)" in source
    assert "cumsum = aten.cumsum.default(" in source   # the header names the fx node


def test_cumsum_of_a_transposed_input():
    check(lambda x: x.t().cumsum(1), torch.randn(5, 3))


def test_cumsum_of_integers_and_bools_is_int64_and_exact():
    """transformers' position ids from a padding mask (RoBERTa):
    ``(cumsum(mask, 1).type_as(mask) + 1) * mask``, and a bool cumsum."""
    mask = torch.ones(2, 7, dtype=torch.int32)
    mask[1, -3:] = 0
    check(lambda m: (torch.cumsum(m, dim=1).type_as(m) + 1) * m, mask, grad=False)
    check(lambda m: (m > 0).cumsum(-1), mask, grad=False)


def test_cumsum_dtype_argument_and_bfloat16():
    check(lambda x: torch.cumsum(x, 1, dtype=torch.float64), torch.randn(3, 6))
    check(lambda x: x.cumsum(0), torch.randn(6, 3).bfloat16())


def test_cumprod_forward_backward():
    """cumprod is a scan; its backward's zero handling (``max.dim`` of a bool
    mask for the first zero's index, a bool ``scatter.value`` marking it) is
    Triton too (were two extern calls): inputs without zeros, with one zero
    in a row and with two."""
    sign = torch.where(torch.rand(3, 6) < 0.5, -1.0, 1.0)
    x = sign * (torch.rand(3, 6) + 0.5)
    check(lambda x: x.cumprod(1), x)
    x[0, 2] = x[1, 1] = x[1, 4] = 0.0
    check(lambda x: x.cumprod(1), x)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.float32])
def test_non_accumulating_scatters_of_any_dtype(dtype):
    """``scatter.value`` / ``scatter.src`` store without atomics, so bool and
    integer outputs are scatter kernels too (cumprod's backward marks the
    first zero with a bool scatter)."""
    base = (torch.randn(3, 6) * 3).to(dtype)
    index = torch.tensor([[2, 4], [0, 0], [5, 1]])
    check(lambda b, i: b.scatter(1, i, 1), base, index, grad=False)
    check(lambda b, i: torch.zeros_like(b).scatter(1, i, b[:, :2]), base, index, grad=False)


def test_looped_scan_carries_across_blocks():
    """An extent above the interpreter's 2**14 block: three blocks per row,
    each continuing from the last result of the one before."""
    x = torch.rand(2, 40000) - 0.25
    check(lambda t: t.cumsum(1), x, grad=False, tolerance=1e-5)
    check(lambda t: t.cumsum(1), (x * 8).round().to(torch.int64), grad=False)


# ---------------------------------------------------------------- fused scans
def _forward_sources(tmp_path) -> list[str]:
    return [path.read_text() for path in kernel_files(tmp_path, "forward")]


def test_position_ids_are_one_scan_kernel(tmp_path):
    """transformers' position ids ``cumsum(mask, 1) * mask - 1``: the scan and
    its epilogue in one kernel that loads the mask once (were a scan kernel
    and a pointwise one, the cumsum stored and read back). Exact."""
    mask = torch.ones(2, 7, dtype=torch.int64)
    mask[1, -3:] = 0
    compiled = check(lambda m: torch.cumsum(m, 1) * m - 1, mask, grad=False,
                     dump_dir=str(tmp_path))
    assert compiled.reports["forward"]["kernels"]["triton"] == 1
    (source,) = _forward_sources(tmp_path)
    assert source.count("tl.load(") == 1 and source.count("tl.store(") == 1


def test_roberta_position_ids_scan_has_its_prologue(tmp_path):
    """RoBERTa's ``(cumsum(ne(ids, pad).int(), 1).type_as(mask) + 0) * mask
    + pad``: the comparison and cast before the scan, the rest after, one kernel."""
    ids = torch.randint(2, 9, (2, 7))
    ids[1, -3:] = 1

    def position_ids(ids):
        mask = ids.ne(1).int()
        return (torch.cumsum(mask, dim=1).type_as(mask) + 0) * mask + 1
    compiled = check(position_ids, ids, grad=False, dump_dir=str(tmp_path))
    assert compiled.reports["forward"]["kernels"]["triton"] == 1


@pytest.mark.parametrize("scan", ["cumsum", "cumprod"])
def test_scan_with_prologue_and_epilogue_forward_backward(scan, tmp_path):
    """``sin(scan(exp(x) * 0.5, 0))``: one forward kernel; gradients as eager's."""
    compiled = check(lambda x: getattr(torch, scan)(x.exp() * 0.5, 0).sin(),
                     torch.randn(5, 3) * 0.3, dump_dir=str(tmp_path))
    assert compiled.reports["forward"]["kernels"]["triton"] == 1


def test_looped_fused_scan_carries_across_blocks():
    """Three blocks per row: the prologue recomputed per block, the epilogue
    reading the carried result."""
    x = torch.rand(2, 40000) - 0.25
    compiled = check(lambda t: (t * 2).cumsum(1) - t, x, grad=False, tolerance=1e-5)
    assert compiled.reports["forward"]["kernels"]["triton"] == 1


def test_a_scan_of_a_scan_is_two_kernels():
    """One scan per kernel: the second reads the first's result from memory."""
    compiled = check(lambda x: x.cumsum(1).cumsum(1) * 2, torch.randn(3, 6), grad=False)
    assert compiled.reports["forward"]["kernels"]["triton"] == 2


# ---------------------------------------------------------------- flip and index
@pytest.mark.parametrize("dims", [[0], [1, 2], [-1]])
def test_flip(dims):
    check(lambda x: x.flip(dims) * 3, torch.randn(3, 4, 5))


INDEXING = {  # name: (function, index shapes, or None for a full slice)
    "leading_broadcast": (lambda x, i, j: x[i, j], [(2, 1), (1, 3)]),
    "inner": (lambda x, i, j: x[:, i], [(2, 2)]),
    "last": (lambda x, i, j: x[..., i], [(4,)]),
    "separated_by_a_slice": (lambda x, i, j: x[i, :, j], [(3,), (3,)]),
    "two_inner": (lambda x, i, j: x[:, i, j], [(2, 3), (3,)]),
}


@pytest.mark.parametrize("name", list(INDEXING))
def test_advanced_indexing_forward_backward(name):
    """Forward: aten.index as loads; backward: index_put with accumulate
    (repeated positions add up) as a scatter kernel."""
    fn, shapes = INDEXING[name]
    indices = [torch.randint(-3, 3, shape) for shape in shapes]   # negatives wrap
    indices[0].view(-1)[:2] = 1                                    # a repeat for sure
    check(lambda x, *idx: fn(x, *idx, *[None] * (2 - len(idx))).sin(), torch.randn(4, 5, 3),
          *indices)


def test_index_of_a_boolean_mask_with_broadcast_aranges():
    """BERT's attention mask: ``mask[batch_arange[:, None, None, None],
    kv_arange[None, None, None, :]]`` on a bool tensor, then a where."""
    def fn(mask, scores):
        b = torch.arange(mask.shape[0])[:, None, None, None]
        k = torch.arange(mask.shape[1])[None, None, None, :]
        return torch.where(mask.bool()[b, k], scores, -1e4)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, -2:] = 0
    check(fn, mask, torch.randn(2, 1, 6, 6))


def test_index_put_with_two_index_tensors():
    """index_put itself (not through autograd), several index tensors."""
    i, j = torch.tensor([0, 2, 2, -1]), torch.tensor([1, 1, 1, 0])
    check(lambda x, v: aten.index_put(x, [i, j], v, True), torch.randn(4, 3, 2),
          torch.randn(4, 2), grad=False)
    check(lambda x, v: aten.index_put(x, [None, i[:2], j[:2]], v, False),
          torch.randn(2, 4, 3), torch.randn(2, 2), grad=False)


# ---------------------------------------------------------------- transformers
@pytest.mark.filterwarnings("ignore")
def test_bert_runs_its_mask_index_in_triton():
    """BERT with library defaults: its attention mask's ``aten.index`` was an
    extern call of the forward; now the only ones left there are matrix
    products and attention. The loss is eager's (the forward alone: the
    index reads no differentiable value)."""
    from hf_zoo import HF_ZOO
    entry = HF_ZOO["bert"]
    model, batch = entry.model().eval(), entry.batch()
    with recording_graphs() as graphs:
        loss = torch.compile(model, backend="retrograd")(**batch).loss
    extern = set()
    for graph in graphs:
        for report in graph.reports.values():
            extern |= set(report["kernels"]["extern_ops"])
    assert extern == {"aten.addmm.default",
                      "aten._scaled_dot_product_flash_attention_for_cpu.default"}, extern
    assert_close_floor(loss, model(**batch).loss, 1e-5)
