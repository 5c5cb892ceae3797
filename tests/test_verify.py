"""``verify=True``: the ``joint`` stage and the floor for mathematically-zero values.

The later stages of verify compare each pass with the decomposed joint
graph, so an error already in the joint graph (a wrong decomposition) would
pass unseen; the ``joint`` stage checks that graph's forward outputs and
gradients against eager autograd on the module as captured. And a value
that is mathematically zero (the gradient of a convolution bias feeding a
BatchNorm in training mode) is rounding noise: it is judged against the
scale of the other outputs, not against itself.
"""

from __future__ import annotations

import logging

import pytest
import retrograd
import retrograd.capture
import retrograd.decompositions
import torch
import torch._decomp
import torch.nn.functional as F
from checks import FACES, compile_with
from retrograd.verify import VerificationError, compare
from torch import nn

pytestmark = pytest.mark.usefixtures("fresh_dynamo", "no_dump_env")

aten = torch.ops.aten


def _with_decomposition(monkeypatch, op, decomposition) -> None:
    """retrograd's table with ``op`` decomposed by ``decomposition`` (sabotage)."""
    table = dict(retrograd.decompositions.decomposition_table())
    table[op] = decomposition
    monkeypatch.setattr(retrograd.capture, "decompositions_for", lambda *args: table)


def _wrong_tanh(x):
    return torch.sigmoid(2 * x)   # tanh(x) is 2 * sigmoid(2x) - 1


class TanhMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


@pytest.mark.parametrize("face", FACES)
def test_joint_stage_catches_a_wrong_decomposition(face, monkeypatch):
    _with_decomposition(monkeypatch, aten.tanh.default, _wrong_tanh)
    torch.manual_seed(0)
    compiled = compile_with(face, TanhMLP(), verify=True, executor="fx")
    with pytest.raises(VerificationError, match="stage 'joint'"):
        compiled(torch.randn(4, 6)).sum().backward()


def test_joint_stage_catches_the_core_flash_attention_decomposition(monkeypatch):
    """PyTorch's core decomposition of the CPU flash attention, which retrograd's
    table leaves out: verify names the joint stage, not a pass."""
    op = aten._scaled_dot_product_flash_attention_for_cpu.default
    _with_decomposition(monkeypatch, op, torch._decomp.core_aten_decompositions()[op])
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 4, requires_grad=True) for _ in range(3))
    compiled = retrograd.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
                                 verify=True, executor="fx")
    with pytest.raises(VerificationError, match="stage 'joint'"):
        compiled(q, k, v).sum().backward()


class ConvBN(nn.Module):
    """A convolution whose bias feeds a BatchNorm in training mode: the bias's
    gradient is mathematically zero (the norm subtracts the channel mean)."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.norm(self.conv(x))


@pytest.mark.parametrize("face", FACES)
def test_joint_stage_runs_and_passes_on_right_graphs(face, caplog):
    """The stage runs (is not skipped) for a plain MLP and for a BatchNorm in
    training mode (running statistics updated in place), and finds nothing."""
    caplog.set_level(logging.INFO, logger="retrograd")
    torch.manual_seed(0)
    for model, x in ((TanhMLP(), torch.randn(4, 6)), (ConvBN(), torch.randn(2, 3, 6, 6))):
        out = compile_with(face, model, verify=True, executor="fx")(x)
        (out * torch.randn(out.shape)).sum().backward()
    assert "joint stage skipped" not in caplog.text


@pytest.mark.parametrize("face", FACES)
def test_conv_bias_into_batchnorm_is_no_false_alarm(face):
    """Generated kernels sum the zero-mean gradient in another order than the
    joint graph: the bias gradient differs in its rounding noise only."""
    for seed in range(2):
        torch.manual_seed(seed)
        model = ConvBN()
        compiled = compile_with(face, model, verify=True, executor="interpret")
        out = compiled(torch.randn(2, 3, 8, 8))
        (out * torch.randn(out.shape)).sum().backward()
        assert model.conv.bias.grad.abs().max() < 1e-4 * model.conv.weight.grad.abs().max()


def test_compare_floor_is_the_scale_of_the_other_outputs():
    weight_grad = torch.randn(4, 3, 3, 3)
    zero = torch.randn(4) * 1e-8                     # rounding noise around zero
    compare("test", [weight_grad, zero + 1e-8], [weight_grad, zero])
    with pytest.raises(VerificationError, match="output 1"):   # a real error still counts
        compare("test", [weight_grad, zero + 1e-2], [weight_grad, zero])
    with pytest.raises(VerificationError, match="output 0"):
        compare("test", [weight_grad * 1.01, zero], [weight_grad, zero])


def test_compare_fails_a_nan_where_the_reference_has_a_number():
    """A NaN the pass made counts even when the reference has a NaN elsewhere
    (the old check looked for any NaN in the reference, and the finite-part
    error came out NaN, which ``error > limit`` let through)."""
    ref = torch.tensor([1.0, float("nan"), 3.0])
    compare("test", [ref.clone()], [ref])                      # NaN where the reference has it
    with pytest.raises(VerificationError, match="produced NaN in output 0"):
        compare("test", [torch.tensor([float("nan"), float("nan"), 3.0])], [ref])
