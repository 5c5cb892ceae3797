"""Complex tensors end to end: values and gradients against eager, both faces.

Codegen has no complex registers, so every node with a complex input or
output must run as an extern aten call (``OpSupport`` refuses it) and the
runtime must carry complex buffers (arena views, conjugate views). The
cleanup pass once dropped ``aten._conj`` as a view that changes nothing
(same shape and strides), which conjugated ``x * y.conj()`` and every
complex gradient (autograd's backward of a product conjugates).
"""

from __future__ import annotations

import pytest
import retrograd
import torch
from retrograd.capture import joint_graph
from retrograd.passes import cleanup
from retrograd.pipeline import OpSupport
from torch import fx

aten = torch.ops.aten


def _index():
    return torch.arange(8).reshape(4, 2) % 4


#: name -> (function, inputs are complex): small functions of one or two 4x4 inputs.
CASES = {
    "mul_conj": (lambda x, y: x * y.conj(), True),
    "conj_physical": (lambda x, y: torch.conj_physical(x) * y, True),
    "abs": (lambda x, y: x.abs() + y.abs(), True),
    "angle": (lambda x, y: x.angle() * y.real, True),
    "real_imag": (lambda x, y: x.real * 2 + y.imag * 3, True),
    "view_as_real": (lambda x, y: torch.view_as_real(x * y) * 2, True),
    "view_as_complex": (lambda x, y: torch.view_as_complex(
        (x + y).reshape(-1, 2)) * (1 + 2j), False),
    "matmul": (lambda x, y: x @ y, True),
    "sum_gather": (lambda x, y: torch.gather(x, 1, _index()).sum(0) + y.mean(), True),
    "fft": (lambda x, y: torch.fft.fft(x) * torch.fft.ifft(y), True),
    "complex_fill": (lambda x, y: x + torch.full_like(y, 2 + 1j) * y.abs(), True),
}


def _inputs(is_complex: bool) -> list[torch.Tensor]:
    dtype = torch.complex64 if is_complex else torch.float32
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(4, 4, dtype=dtype, generator=generator) for _ in range(2)]


def _values_and_grads(function, inputs):
    """The output and the gradients of a real loss that mixes the output's
    real and imaginary parts (a loss of only |out|^2 would hide a conjugate)."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = function(*leaves)
    weights = torch.linspace(0.1, 1.0, out.numel()).reshape(out.shape)
    if out.is_complex():
        loss = (out.real * weights).sum() + (out.imag * weights.flip(0)).sum() \
            + (out * out.conj()).real.sum()
    else:
        loss = (out * weights).sum()
    return [out.detach()] + list(torch.autograd.grad(loss, leaves))


def _assert_matches(got, ref):
    for index, (a, b) in enumerate(zip(got, ref)):
        assert a.dtype == b.dtype and a.shape == b.shape, index
        error = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-6)
        assert error < 1e-5, f"{'output' if index == 0 else f'grad {index - 1}'}: {error:.3g}"


@pytest.mark.parametrize("face", ["compile", "torch.compile"])
@pytest.mark.parametrize("name", list(CASES))
def test_complex_gradients(name, face, fresh_dynamo):
    function, is_complex = CASES[name]
    inputs = _inputs(is_complex)
    if face == "compile":
        compiled = retrograd.compile(function, executor="interpret")
    else:
        compiled = torch.compile(function, backend="retrograd",
                                 options={"executor": "interpret"})
    _assert_matches(_values_and_grads(compiled, inputs), _values_and_grads(function, inputs))


class _Wrap(torch.nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, *inputs):
        return (self.function(*inputs),)


@pytest.mark.parametrize("name", ["mul_conj", "sum_gather", "complex_fill", "view_as_real"])
def test_codegen_refuses_complex_nodes(name):
    """No node with a complex input or output is claimed by any kernel family."""
    function, is_complex = CASES[name]
    inputs = [x.requires_grad_(True) for x in _inputs(is_complex)]
    joint, _, _ = joint_graph(_Wrap(function), inputs)
    claims = []
    for node in joint.graph.nodes:
        values = [node.meta.get("val")] + [a.meta.get("val") for a in node.all_input_nodes]
        if node.op != "call_function" or not any(
                isinstance(v, torch.Tensor) and v.is_complex() for v in values):
            continue
        for predicate in ("can_lower", "can_reduce", "reads_by_index", "can_scatter",
                          "can_pool", "is_fill"):
            if getattr(OpSupport, predicate)(node):
                claims.append(f"{predicate}({node.format_node()})")
    assert not claims


def test_cleanup_keeps_conjugate_views():
    """``_conj(y)`` has y's shape, strides and dtype but not its values: the
    no-op view removal must keep it (and ``_neg_view``, and the double
    conjugate: views that change meaning are never treated as no-ops)."""
    x, y = (torch.randn(3, dtype=torch.complex64) for _ in range(2))

    def function(x, y):
        once = aten._conj.default(y)
        twice = aten._conj.default(once)
        negated = aten._neg_view.default(x)
        return aten.mul.Tensor(aten.mul.Tensor(x, once), aten.add.Tensor(twice, negated))

    gm = fx.experimental.proxy_tensor.make_fx(function)(x, y)
    expected = gm(x, y)
    removed = cleanup.remove_no_op_views(gm.graph)
    gm.recompile()
    kept = {node.target for node in gm.graph.nodes}
    assert aten._conj.default in kept and aten._neg_view.default in kept
    assert removed == 0
    torch.testing.assert_close(gm(x, y), expected)


def test_views_of_numbers_fold():
    """AOTAutograd writes the backward of ``z * (1+2j)`` as ``_conj((1+2j))``: a
    view of a Python number, which later passes cannot read as a node."""
    graph = fx.Graph()
    tangent = graph.placeholder("tangent")
    conj = graph.call_function(aten._conj.default, (1 + 2j,))
    graph.output(graph.call_function(aten.mul.Tensor, (tangent, conj)))
    assert cleanup.fold_number_views(graph) == 1
    gm = fx.GraphModule(torch.nn.Module(), graph)
    z = torch.randn(3, dtype=torch.complex64)
    torch.testing.assert_close(gm(z), z * (1 - 2j))
