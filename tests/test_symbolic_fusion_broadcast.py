"""Size-generic pointwise kernels with broadcast operands (issue 14 item 4):
a bias ``[C]`` against ``[s0, C]``, a per-row ``[s0, 1]``, a 0-dim value and
a trailing block ``[T, T]`` against ``[s0, H, T, T]`` run inside one kernel,
its index arithmetic taking the run's sizes as launch arguments, so one
kernel file serves every size (checked against eager at sizes never traced)."""

from __future__ import annotations

import pytest
import torch
from checks import assert_close
from torch.fx.experimental.proxy_tensor import make_fx

pytestmark = pytest.mark.usefixtures("cache")


def _fused(function, *examples):
    from retrograd.symbolic_fusion import fuse_pointwise
    gm = make_fx(function, tracing_mode="symbolic")(*examples)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return fuse_pointwise(gm, "interpret")


def _kernel_nodes(gm, prefix="sized_pointwise"):
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and getattr(n.target, "__name__", "").startswith(prefix)]


def _torch_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and str(n.target).startswith("aten.") and "sym_size" not in str(n.target)]


def bias_and_row_scale(x, bias, scale):
    return ((x + bias).sin() * scale).exp() - 1.0


def test_a_bias_and_a_per_row_scale_fuse_into_one_kernel_for_every_size():
    x, bias, scale = torch.randn(4, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64), \
        torch.randn(4, 1, dtype=torch.float64)
    gm, kernels = _fused(bias_and_row_scale, x, bias, scale)
    assert kernels == 1 and not _torch_calls(gm), gm.code
    (call,) = _kernel_nodes(gm)
    assert "% in1_span" in call.target.source and "in2_inner" in call.target.source
    for rows in (1, 3, 37):   # never traced
        x, scale = torch.randn(rows, 6, dtype=torch.float64), torch.randn(rows, 1,
                                                                          dtype=torch.float64)
        bias = torch.randn(6, dtype=torch.float64)
        got = gm(x, bias, scale)
        assert_close(got, bias_and_row_scale(x, bias, scale), torch.float64)


def masked_scores(scores, keep, fill):
    return (scores * 0.5 + keep) * fill


def test_a_trailing_block_and_a_0_dim_value_broadcast_in_a_4d_run():
    scores, keep = torch.randn(2, 2, 4, 4), torch.randn(4, 4)
    gm, kernels = _fused(masked_scores, scores, keep, torch.tensor(3.0))
    assert kernels == 1 and not _torch_calls(gm), gm.code
    for batch in (3, 5):
        scores, keep, fill = torch.randn(batch, 2, 4, 4), torch.randn(4, 4), torch.tensor(-2.0)
        got = gm(scores, keep, fill)
        assert_close(got, masked_scores(scores, keep, fill), torch.float32)


def outer_sum(column, row):
    return (column + row).cos()


def test_a_run_with_no_operand_of_its_shape_takes_the_broadcast_shape():
    """[s0, 1] + [C]: neither input has the run's shape; the launcher
    allocates the broadcast shape."""
    gm, kernels = _fused(outer_sum, torch.randn(4, 1), torch.randn(5))
    assert kernels == 1 and not _torch_calls(gm), gm.code
    for rows in (2, 9):
        column, row = torch.randn(rows, 1), torch.randn(5)
        got = gm(column, row)
        assert got.shape == (rows, 5)
        assert_close(got, outer_sum(column, row), torch.float32)


def interleaved(x, y):
    return (x * y).sin()


def test_an_interleaved_broadcast_stays_a_torch_call():
    """[s0, 1, C] against [s0, T, C] is no single block: not fused (torch call)."""
    gm, _ = _fused(interleaved, torch.randn(3, 1, 4), torch.randn(3, 5, 4))
    assert [n.target for n in _torch_calls(gm)] == [torch.ops.aten.mul.Tensor]
    x, y = torch.randn(6, 1, 4), torch.randn(6, 5, 4)
    assert_close(gm(x, y), interleaved(x, y), torch.float32)


def test_compiled_with_two_batch_sizes_gradients_match_eager_at_a_third():
    import retrograd

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))

        def forward(self, x, scale):
            return ((x + self.bias).sin() * scale).square().sum()

    torch.manual_seed(0)
    model, reference = Scaled(), Scaled()
    reference.load_state_dict(model.state_dict())
    compiled = retrograd.compile(model, executor="interpret")
    for rows in (2, 3, 11):
        x = torch.randn(rows, 6, dtype=torch.float64, requires_grad=True)
        scale = torch.randn(rows, 1, dtype=torch.float64, requires_grad=True)
        got = compiled(x, scale)
        got.backward()
        x2, s2 = (t.detach().clone().requires_grad_() for t in (x, scale))
        want = reference(x2, s2)
        want.backward()
        assert_close(got, want, torch.float64)
        for a, b in ((x.grad, x2.grad), (scale.grad, s2.grad),
                     (model.bias.grad, reference.bias.grad)):
            assert_close(a, b, torch.float64, what="gradient")
        model.zero_grad()
        reference.zero_grad()
    report = compiled.reports["forward"]
    assert "symbolic" in report
    assert "aten.add.Tensor" not in report["kernels"]["extern_ops"], report["kernels"]


def masked_scale(grad, keep):
    """As attention's backward: a gradient zeroed where a [T, T] mask is off, scaled."""
    return torch.where(keep, grad, torch.zeros((), dtype=grad.dtype)) * 0.25


def test_a_where_with_a_broadcast_boolean_mask_fuses_into_the_run():
    keep = torch.tril(torch.ones(4, 4, dtype=torch.bool))
    gm, kernels = _fused(masked_scale, torch.randn(2, 2, 4, 4), keep)
    assert kernels == 1 and [n.target for n in _torch_calls(gm)] == \
        [torch.ops.aten.zeros.default], gm.code
    for batch, tokens in ((3, 4), (5, 7)):
        keep = torch.rand(tokens, tokens) > 0.5
        grad = torch.randn(batch, 2, tokens, tokens)
        assert_close(gm(grad, keep), masked_scale(grad, keep), torch.float32)


def gelu_tanh(x):
    """GPT-2's gelu_new: a cube and a tanh (the interpreter has no libdevice tanh)."""
    inner = 0.7978845608028654 * (x + 0.044715 * torch.pow(x, 3.0))
    return 0.5 * x * (1.0 + torch.tanh(inner)) + torch.pow(x, 2)


def test_gelu_tanh_with_its_cube_and_tanh_is_one_kernel():
    gm, kernels = _fused(gelu_tanh, torch.randn(4, 6, dtype=torch.float64))
    assert kernels == 1 and not _torch_calls(gm), gm.code
    for rows in (3, 9):
        x = torch.randn(rows, 6, dtype=torch.float64) * 3
        assert_close(gm(x), gelu_tanh(x), torch.float64)
