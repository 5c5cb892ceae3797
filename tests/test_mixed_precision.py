"""Mixed precision through retrograd: CPU autocast, GradScaler, half-precision models.

Models come from the zoo (tests/zoo.py): the MLP (Linear, GELU, residual,
LayerNorm) and the pre-norm causal attention block. Compiled runs are
compared with eager runs under the same autocast state: outputs carry
eager's dtypes and lie within 5e-2 relative error of eager's, as do the
gradients; float32 parameters get float32 gradients. Matrix products are
extern calls by design, every other op (casts included) runs in Triton.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import retrograd
from checks import relative_error
from zoo import ZOO, MLP

MATMULS = {"aten.addmm.default", "aten.mm.default", "aten.bmm.default"}
AUTOCAST_TOLERANCE = 5e-2


def _cpu_autocast_supports(dtype: torch.dtype) -> bool:
    """Whether this torch's CPU autocast runs a matrix product in ``dtype``."""
    try:
        with torch.autocast("cpu", dtype=dtype):
            return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype
    except (RuntimeError, ValueError):
        return False


HALF_TYPES = [
    pytest.param(torch.bfloat16, id="bfloat16"),
    pytest.param(torch.float16, id="float16", marks=pytest.mark.skipif(
        not _cpu_autocast_supports(torch.float16),
        reason="this torch's CPU autocast does not support float16")),
]


def loss_of(output: torch.Tensor) -> torch.Tensor:
    """The zoo's weighted sum of squares, taken in float32 (float64 for float64)."""
    dtype = torch.float64 if output.dtype == torch.float64 else torch.float32
    weights = torch.linspace(0.5, 1.5, output.numel(), dtype=dtype).view(output.shape)
    return (output.to(dtype).square() * weights).sum()


def assert_only_matmuls_extern(compiled) -> None:
    for half in ("forward", "backward"):
        kernels = compiled.reports[half]["kernels"]
        assert set(kernels["extern_ops"]) <= MATMULS, (half, kernels["extern_ops"])
        assert kernels["pointwise_ops_in_triton"] == kernels["pointwise_ops"], (half, kernels)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(31)


# ---------------------------------------------------------------- autocast
@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("name", ["mlp", "attention_block"])
def test_autocast_matches_eager(name, dtype):
    entry = ZOO[name]
    model = entry.model()
    reference = copy.deepcopy(model)
    compiled = retrograd.compile(model, executor="interpret")
    (x,) = entry.inputs()
    mine, theirs = (x.detach().clone().requires_grad_() for _ in range(2))

    with torch.autocast("cpu", dtype=dtype):
        got, expected = compiled(mine), reference(theirs)
        loss_of(got).backward()
        loss_of(expected).backward()

    assert got.dtype == expected.dtype, f"output dtype {got.dtype} != eager's {expected.dtype}"
    assert relative_error(got, expected) < AUTOCAST_TOLERANCE
    assert mine.grad.dtype == x.dtype
    assert relative_error(mine.grad, theirs.grad) < AUTOCAST_TOLERANCE
    for (param_name, param), eager_param in zip(model.named_parameters(),
                                                reference.parameters()):
        assert param.dtype == torch.float32
        assert param.grad is not None and param.grad.dtype == torch.float32, param_name
        error = relative_error(param.grad, eager_param.grad)
        assert error < AUTOCAST_TOLERANCE, f"grad of {param_name}: relative error {error:.3g}"
    assert_only_matmuls_extern(compiled)


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_autocast_state_is_part_of_the_signature(dtype):
    """The same module called with and without autocast: each call is right."""
    model = MLP()
    compiled = retrograd.compile(model, executor="interpret")
    x = torch.randn(4, 8)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=dtype):
            low, low_eager = compiled(x), model(x)
        full, full_eager = compiled(x), model(x)
    assert low.dtype == low_eager.dtype == dtype
    assert full.dtype == full_eager.dtype == torch.float32
    assert relative_error(low, low_eager) < AUTOCAST_TOLERANCE
    assert relative_error(full, full_eager) < 1e-5


# ---------------------------------------------------------------- GradScaler
def _scaled_training(model, x, target, steps: int = 3):
    """SGD with a GradScaler whose scale first overflows the float16 backward
    (the step is skipped and the scale backs off), then grows every step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 24, growth_factor=2.0,
                                  backoff_factor=2.0 ** -12, growth_interval=1)
    losses, scales = [], []
    for _ in range(steps):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.mse_loss(model(x).float(), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
        scales.append(scaler.get_scale())
    return losses, scales


@pytest.mark.skipif(not _cpu_autocast_supports(torch.float16),
                    reason="this torch's CPU autocast does not support float16")
def test_grad_scaler_loop_matches_eager():
    model = MLP()
    reference = copy.deepcopy(model)
    x, target = torch.randn(16, 8), torch.randn(16, 4)
    losses, scales = _scaled_training(retrograd.compile(model, executor="interpret"), x, target)
    eager_losses, eager_scales = _scaled_training(reference, x, target)
    assert scales == eager_scales
    assert scales[0] < 2.0 ** 24 and scales[2] > scales[1] > scales[0], scales   # both paths
    assert all(math.isfinite(v) for v in losses)
    for got, expected in zip(losses, eager_losses):
        assert abs(got - expected) <= 1e-3 * abs(expected), (losses, eager_losses)
    for (name, param), eager_param in zip(model.named_parameters(), reference.parameters()):
        assert relative_error(param, eager_param) < 1e-3, name


# ---------------------------------------------------------------- half-precision models
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["half", "bfloat16"])
@pytest.mark.parametrize("name", ["mlp", "attention_block"])
def test_half_precision_model(name, dtype):
    """model.half() / .bfloat16(): weights, inputs, outputs and gradients all in
    ``dtype``; compared with the float64 model (eager's own half-precision run
    is about 5e-3 off it)."""
    entry = ZOO[name]
    model = entry.model()
    wide = copy.deepcopy(model).double()
    model = model.to(dtype)
    compiled = retrograd.compile(model, executor="interpret")
    (x,) = entry.inputs()
    mine = x.detach().to(dtype).requires_grad_()
    x64 = mine.detach().double().requires_grad_()

    got, expected = compiled(mine), wide(x64)
    assert got.dtype == dtype
    assert relative_error(got, expected) < 2e-2
    loss_of(got).backward()
    loss_of(expected).backward()
    assert mine.grad.dtype == dtype and relative_error(mine.grad, x64.grad) < 2e-2
    for (param_name, param), wide_param in zip(model.named_parameters(), wide.parameters()):
        assert param.grad.dtype == dtype, param_name
        error = relative_error(param.grad, wide_param.grad)
        assert error < 2e-2, f"grad of {param_name}: relative error {error:.3g}"
    assert_only_matmuls_extern(compiled)
