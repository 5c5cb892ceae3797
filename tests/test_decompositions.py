"""Every decomposition retrograd traces with, against the op it replaces.

AOTAutograd pairs a decomposed forward with the op's own derivative
formula, so a decomposition that differs from its op in any output (the
attention probabilities returned where the backward expects the
logsumexp) makes the joint graph wrong without an error. This check runs
PyTorch's OpInfo samples in eager, forward and backward, under a dispatch
mode that sees every aten call; each call of an op retrograd decomposes
(the table, and the Autograd-key decompositions PyTorch applies while
tracing, with ``AUTOGRAD_FIXES`` in place) is run again through its
decomposition, and every output must match the op's own.
"""

from __future__ import annotations

import collections
import itertools

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.testing._internal.common_methods_invocations import op_db
from torch.utils._python_dispatch import TorchDispatchMode

import retrograd
from checks import eager_step
from retrograd.decompositions import AUTOGRAD_FIXES, EXCLUDED, FIXED, decomposition_table

aten = torch.ops.aten
SAMPLES_PER_OP = 4

#: Ops whose outputs carry no values to compare: memory left uninitialized.
UNINITIALIZED = {aten.empty_like.default, aten.new_empty.default, aten.empty.memory_format,
                 aten.new_empty_strided.default, aten.empty_strided.default}


def traced_decompositions(table: dict) -> dict:
    """What tracing applies: ``table``, then the Autograd-key ones (fixed where we fix them)."""
    found = dict(table)
    key = torch._C.DispatchKey.Autograd
    for op in list(table) + list(AUTOGRAD_FIXES):
        kernel = AUTOGRAD_FIXES.get(op) or getattr(op, "py_kernels", {}).get(key)
        if kernel is not None:
            found[op] = kernel
    return found


def _mismatch(got, want) -> str | None:
    if not (isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor)):
        return None
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)}, the op's {tuple(want.shape)}"
    if want.numel() == 0:
        return None
    if not (want.is_floating_point() or want.is_complex()):
        return None if torch.equal(got.to(want.dtype), want) else "values differ"
    wide = torch.complex128 if want.is_complex() else torch.float64
    got, want = got.to(want.dtype).to(wide), want.to(wide)
    if not torch.equal(got.isnan(), want.isnan()):
        return "NaN positions differ"
    finite = want.isfinite() & got.isfinite()
    if not finite.any():
        return None
    error = (got - want)[finite].abs().max().item()
    scale = max(want[finite].abs().max().item(), 1.0)
    tolerance = 1e-2 if want.dtype in (torch.float16, torch.bfloat16) else 1e-4
    return None if error <= tolerance * scale else f"max error {error:.3g} (scale {scale:.3g})"


class CrossCheck(TorchDispatchMode):
    """Runs each decomposed op's decomposition beside it; records mismatches."""

    def __init__(self, decompositions: dict):
        super().__init__()
        self.decompositions = decompositions
        self.checked = collections.Counter()
        self.wrong: dict[str, str] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        before = torch.get_rng_state()
        out = func(*args, **kwargs)
        decomposition = self.decompositions.get(func)
        if decomposition is None or func in UNINITIALIZED or func._schema.is_mutable:
            return out
        after = torch.get_rng_state()
        if not torch.equal(before, after):   # it drew random numbers: no twin to compare
            return out
        try:
            mine = decomposition(*args, **kwargs)
        except Exception:   # noqa: BLE001 - a decomposition that refuses is not a wrong one
            return out
        finally:
            torch.set_rng_state(after)
        if mine is NotImplemented:
            return out
        self.checked[str(func)] += 1
        for i, (got, want) in enumerate(zip(pytree.tree_leaves(mine), pytree.tree_leaves(out))):
            problem = _mismatch(got, want)
            if problem:
                self.wrong.setdefault(str(func), f"output {i}: {problem}")
                break
        return out


def _run_sample(info, sample) -> None:
    out = info(sample.input, *sample.args, **sample.kwargs)
    outs = [o for o in pytree.tree_leaves(out)
            if isinstance(o, torch.Tensor) and o.requires_grad]
    inputs = [t for t in pytree.tree_leaves((sample.input, sample.args, sample.kwargs))
              if isinstance(t, torch.Tensor) and t.requires_grad]
    if outs and inputs:
        torch.autograd.grad(outs, inputs, [torch.ones_like(o) for o in outs], allow_unused=True)


def cross_check(decompositions: dict, infos=op_db) -> CrossCheck:
    mode = CrossCheck(decompositions)
    for info in infos:
        if torch.float32 not in info.supported_dtypes("cpu"):
            continue
        try:
            samples = list(itertools.islice(
                info.sample_inputs("cpu", torch.float32, requires_grad=info.supports_autograd),
                SAMPLES_PER_OP))
        except Exception:   # noqa: BLE001 - OpInfos whose samples need more than a CPU
            continue
        for sample in samples:
            with mode:
                try:
                    _run_sample(info, sample)
                except Exception:   # noqa: BLE001 - samples eager itself rejects
                    pass
    return mode


def _extra_cases() -> None:
    """Calls the OpInfo samples miss: attention, target lists ended by -1."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 8, requires_grad=True) for _ in range(3))
    F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    x = torch.randn(4, 6, requires_grad=True)
    target = torch.tensor([[3, 0, -1, 1, 1, 1], [2, -1, 0, 0, 0, 0],
                           [5, 4, 3, 2, 1, 0], [-1, 1, 1, 1, 1, 1]])
    F.multilabel_margin_loss(x, target).backward()


def test_every_decomposition_matches_its_op():
    mode = cross_check(traced_decompositions(decomposition_table(full_table=True)))
    with mode:
        _extra_cases()
    assert len(mode.checked) > 150, "the cross-check reached too few decomposed ops"
    assert not mode.wrong, f"decompositions that differ from their op: {mode.wrong}"


def test_cross_check_finds_the_excluded_entries():
    """The check above can fail: PyTorch's own entries that retrograd leaves out
    are caught by it."""
    core = torch._decomp.core_aten_decompositions()
    table = {op: core[op] for op in EXCLUDED if op in core}
    key = torch._C.DispatchKey.Autograd
    table.update({op: op.py_kernels[key] for op in AUTOGRAD_FIXES if key in op.py_kernels})
    mode = CrossCheck(table)
    with mode:
        _extra_cases()
    assert set(mode.wrong) == {str(op) for op in EXCLUDED}, mode.wrong


@pytest.mark.parametrize("reduction", [1, 2])
def test_soft_margin_loss_backward_keeps_small_gradients(reduction):
    """Where ``y * x`` is large the gradient is ~exp(-y * x): PyTorch's
    ``y * (sigmoid(y * x) - 1)`` cancels to a few ulps in float32 (so the
    cross-check above, relative to the largest value, cannot see it); ours
    stays within float32 rounding of the float64 truth."""
    op = aten.soft_margin_loss_backward.default
    x = torch.tensor([12.0, 13.0, -14.0, 9.0])
    y = torch.tensor([1.0, 1.0, -1.0, 1.0])
    grad = torch.tensor(1.0) if reduction else torch.ones(4)
    truth = op(grad.double(), x.double(), y.double(), reduction)
    ours = decomposition_table()[op](grad, x, y, reduction)
    theirs = torch._decomp.core_aten_decompositions()[op](grad, x, y, reduction)
    relative = lambda got: ((got.double() - truth).abs() / truth.abs()).max().item()  # noqa
    assert relative(ours) < 1e-6
    assert relative(theirs) > 1e-3, "PyTorch's entry was fixed: FIXED can drop it"


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_multilabel_margin_loss_after_terminator(reduction):
    """The Autograd-key decomposition counted the padding after -1 as targets."""
    torch.manual_seed(0)
    x = torch.randn(4, 6, requires_grad=True)
    target = torch.tensor([[3, 0, -1, 1, 1, 1], [2, -1, 0, 0, 0, 0],
                           [5, 4, 3, 2, 1, 0], [-1, 1, 1, 1, 1, 1]])
    function = lambda x: F.multilabel_margin_loss(x, target, reduction=reduction)  # noqa: E731
    x2 = x.detach().clone().requires_grad_()
    expected = function(x)
    got = retrograd.compile(function)(x2)
    torch.testing.assert_close(got, expected)
    expected.sum().backward()
    got.sum().backward()
    torch.testing.assert_close(x2.grad, x.grad)


def test_compile_step_traces_with_the_fixed_decompositions():
    """compile_step traces its own graph (make_fx): it must use the fixes too."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 6)
    reference = torch.nn.Linear(6, 6)
    reference.load_state_dict(model.state_dict())
    target = torch.tensor([[3, 0, -1, 1, 1, 1], [2, -1, 0, 0, 0, 0]])
    x = torch.randn(2, 6)
    loss_fn = lambda m, x: F.multilabel_margin_loss(m(x), target)  # noqa: E731
    step = retrograd.compile_step(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1))
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(2):
        got = step(x)
        expected = eager_step(reference, optimizer, loss_fn, x)
        torch.testing.assert_close(got.detach(), expected.detach())
    torch.testing.assert_close(model.weight, reference.weight)
