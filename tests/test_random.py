"""Random numbers through retrograd: dropout and ``rand_like``.

Generated kernels draw from a counter-based Philox stream keyed by a seed the
runtime takes from torch's generator once per call, so they cannot reproduce
eager's numbers bit for bit (../shared/TRITON_ON_CPU.md). These tests check
what must hold instead: the backward sees the forward's mask, keep rates and
uniform moments within a few standard deviations of their expectations
(about 100k draws each, 5 sigma bounds), kept values scaled by 1/(1-p),
``torch.manual_seed`` reproducibility, independent streams for independent
draws, no randomness in eval mode, and a model with dropout that trains.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import retrograd

SHAPE = (256, 400)            # 102,400 draws
N = SHAPE[0] * SHAPE[1]


def away_from_zero(*shape, dtype=torch.float32) -> torch.Tensor:
    """Random values with |x| >= 0.5: a zero output can only mean a dropped element."""
    sign = torch.where(torch.rand(shape) < 0.5, -1.0, 1.0)
    return (sign * (torch.rand(shape) + 0.5)).to(dtype)


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    stacked = torch.stack([a.flatten().double(), b.flatten().double()])
    return torch.corrcoef(stacked)[0, 1].item()


def assert_no_extern(compiled, halves=("forward", "backward")) -> None:
    """Everything runs in Triton but the seed draws (one ``randint`` per random
    node, from torch's generator: compiler/rng.py), and only in the forward."""
    for half in halves:
        kernels = compiled.reports[half]["kernels"]
        extern = dict(kernels["extern_ops"])
        draws = extern.pop("aten.randint.low", 0)
        assert extern == {} and kernels["triton"] >= 1, (half, kernels)
        assert half == "forward" or draws == 0, (half, kernels)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(99)


# ---------------------------------------------------------------- dropout
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_rate_scale_and_backward(p):
    compiled = retrograd.compile(lambda x: F.dropout(x, p, training=True),
                                 executor="interpret")
    x = away_from_zero(*SHAPE).requires_grad_()
    out = compiled(x)
    kept = out != 0

    # keep rate: binomial, 5 standard deviations
    rate = kept.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / N)
    assert abs(rate - (1 - p)) < 5 * sigma, f"keep rate {rate:.4f}, expected {1 - p}"

    # kept values are scaled by 1 / (1 - p); dropped ones are exactly zero
    torch.testing.assert_close(out[kept], x.detach()[kept] / (1 - p), rtol=1e-6, atol=0)

    # the backward applies the forward's mask
    upstream = torch.randn(SHAPE)
    out.backward(upstream)
    torch.testing.assert_close(x.grad, upstream * kept / (1 - p), rtol=1e-6, atol=1e-7)
    assert_no_extern(compiled)


def test_the_backward_recomputes_the_mask_from_the_forward_seed():
    """Checkpoint placement saves the seed (8 bytes), not the mask: the backward
    draws the same numbers again and applies exactly the forward's mask."""
    def fn(x, w):
        return F.dropout(torch.tanh(x @ w), 0.3, training=True)
    compiled = retrograd.compile(fn, executor="interpret")
    x = away_from_zero(*SHAPE).requires_grad_()
    w = (torch.eye(SHAPE[1]) + 0.01).requires_grad_()
    out = compiled(x, w)
    upstream = torch.randn(SHAPE)
    out.backward(upstream)
    stats = next(p["stats"] for p in compiled.reports["forward"]["passes"]
                 if p["name"] == "checkpoint")
    assert "randint" in stats["saved"] and "uniform" in stats["recomputed"]
    assert not any(name.startswith(("gt", "uniform")) for name in stats["saved"])
    reference = x.detach().clone().requires_grad_()
    kept = (out != 0).float()
    (torch.tanh(reference @ w.detach()) * kept / 0.7).backward(upstream)
    torch.testing.assert_close(x.grad, reference.grad, rtol=1e-5, atol=1e-6)


def test_dropout_mask_in_bfloat16():
    compiled = retrograd.compile(lambda x: F.dropout(x, 0.3, training=True),
                                 executor="interpret")
    x = away_from_zero(64, 100, dtype=torch.bfloat16).requires_grad_()
    out = compiled(x)
    upstream = torch.randn(out.shape).to(torch.bfloat16)
    out.backward(upstream)
    kept = out != 0
    assert out.dtype == x.grad.dtype == torch.bfloat16
    assert 0.6 < kept.float().mean().item() < 0.8
    expected = (upstream.float() * kept / 0.7).to(torch.bfloat16)
    torch.testing.assert_close(x.grad, expected, rtol=1e-2, atol=0)


def test_manual_seed_repeats_and_calls_differ():
    compiled = retrograd.compile(lambda x: F.dropout(x, 0.5, training=True),
                                 executor="interpret")
    x = away_from_zero(*SHAPE)
    torch.manual_seed(1)
    first, second = compiled(x), compiled(x)
    torch.manual_seed(1)
    again = compiled(x)
    assert torch.equal(first, again), "the same seed must give the same mask"
    assert not torch.equal(first != 0, second != 0), "consecutive calls drew the same mask"
    assert abs(correlation(first != 0, second != 0)) < 5 / math.sqrt(N)


def test_two_dropouts_in_one_graph_are_independent():
    compiled = retrograd.compile(lambda x: (F.dropout(x, 0.5), F.dropout(x, 0.5)),
                                 executor="interpret")
    a, b = compiled(away_from_zero(*SHAPE))
    assert abs(correlation(a != 0, b != 0)) < 5 / math.sqrt(N)
    # each draw has a seed of its own: two streams, not two stretches of one
    assert compiled.reports["forward"]["kernels"]["extern_ops"] == {"aten.randint.low": 2}


def test_dropouts_in_different_kernels_are_independent():
    """The two draws are in kernels on either side of a matrix product: each
    random node has a stream of its own (its own seed)."""
    def fn(x, w):
        first = F.dropout(x, 0.5)
        return first, F.dropout(first @ w + 1.0, 0.5)
    compiled = retrograd.compile(fn, executor="interpret")
    x, w = away_from_zero(*SHAPE), torch.rand(SHAPE[1], SHAPE[1]) / SHAPE[1]
    first, second = compiled(x, w)
    assert compiled.reports["forward"]["kernels"]["triton"] >= 2
    assert abs(correlation(first != 0, second != 0)) < 5 / math.sqrt(N)


def test_eval_mode_has_no_randomness():
    model = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5), nn.Linear(16, 4))
    reference = copy.deepcopy(model)
    compiled = retrograd.compile(model, executor="interpret")
    x = torch.randn(8, 16)

    model.train()
    state = torch.get_rng_state()
    compiled(x)
    assert not torch.equal(torch.get_rng_state(), state), "training mode should draw a seed"

    model.eval()
    reference.eval()
    state = torch.get_rng_state()
    first, second = compiled(x), compiled(x)
    assert torch.equal(torch.get_rng_state(), state), "eval mode drew random numbers"
    assert torch.equal(first, second)
    torch.testing.assert_close(first, reference(x), rtol=1e-5, atol=1e-6)

    functional = retrograd.compile(lambda x: F.dropout(x, 0.5, training=False) * 2,
                                   executor="interpret")
    assert torch.equal(functional(x), x * 2)


class DropoutMLP(nn.Module):
    """Returns the dropout output too, so a test can read the mask it drew."""

    def __init__(self, p: float = 0.3):
        super().__init__()
        self.up, self.down, self.p = nn.Linear(16, 32), nn.Linear(32, 4), p

    def forward(self, x):
        dropped = F.dropout(torch.relu(self.up(x)), self.p, training=self.training)
        return self.down(dropped), dropped


def test_model_with_dropout_trains():
    model = DropoutMLP()
    reference = copy.deepcopy(model)
    compiled = retrograd.compile(model, executor="interpret")
    x, target = torch.randn(32, 16), torch.randn(32, 4)

    # one step: the gradients are eager's for the mask the compiled forward drew
    out, dropped = compiled(x)
    F.mse_loss(out, target).backward()
    mask = dropped.detach() != 0     # relu's zeros and dropout's: both stop the gradient
    hidden = torch.relu(reference.up(x)) * mask / (1 - model.p)
    F.mse_loss(reference.down(hidden), target).backward()
    for (name, got), expected in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-5, atol=1e-6, msg=name)

    # and it learns
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = F.mse_loss(compiled(x)[0], target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


# ---------------------------------------------------------------- rand_like
def test_rand_like_is_uniform():
    compiled = retrograd.compile(lambda x: torch.rand_like(x), executor="interpret")
    values = compiled(torch.randn(SHAPE))
    assert values.dtype == torch.float32 and values.shape == SHAPE
    assert values.min().item() >= 0.0 and values.max().item() < 1.0
    sigma = math.sqrt(1 / 12 / N)
    assert abs(values.double().mean().item() - 0.5) < 5 * sigma
    assert abs(values.double().var().item() - 1 / 12) < 0.01
    # each tenth of [0, 1) holds a tenth of the values
    counts = torch.histc(values, bins=10, min=0.0, max=1.0)
    assert ((counts / N - 0.1).abs() < 5 * math.sqrt(0.09 / N)).all(), counts
    # no correlation between neighbours along a row, down a column, or in flat order
    bound = 5 / math.sqrt(N)
    assert abs(correlation(values[:, :-1], values[:, 1:])) < bound
    assert abs(correlation(values[:-1], values[1:])) < bound
    flat = values.flatten()
    assert abs(correlation(flat[:-1], flat[1:])) < bound
    kernels = compiled.reports["forward"]["kernels"]
    assert kernels["triton"] == 1 and kernels["extern_ops"] == {"aten.randint.low": 1}, kernels


def test_rand_like_repeats_under_manual_seed():
    compiled = retrograd.compile(lambda x: torch.rand_like(x), executor="interpret")
    x = torch.randn(64, 64)
    torch.manual_seed(5)
    first, second = compiled(x), compiled(x)
    torch.manual_seed(5)
    assert torch.equal(compiled(x), first)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("dtype, digits", [(torch.float16, 11), (torch.bfloat16, 8)],
                         ids=["float16", "bfloat16"])
def test_rand_like_half_stays_below_one(dtype, digits):
    """As torch draws them: k / 2**digits, never 1.0 (rounding a float32 draw
    near 1 to the half type would give 1.0)."""
    compiled = retrograd.compile(lambda x: torch.rand_like(x), executor="interpret")
    values = compiled(torch.randn(SHAPE).to(dtype))
    assert values.dtype == dtype
    assert values.min().item() >= 0.0 and values.max().item() < 1.0
    scaled = values.double() * 2 ** digits
    assert torch.equal(scaled, scaled.floor()), "values off the type's uniform grid"
    assert abs(values.double().mean().item() - 0.5) < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uniform_drawn_in_chunks_is_the_philox_stream(monkeypatch, dtype):
    """retrograd::uniform's eager form (the torch program's, verify's) draws
    ``rng.CHUNK`` elements at a time: across chunk boundaries, and from an
    offset, every element is Philox's value at its counter (numpy reference)."""
    import numpy
    from retrograd import rng
    monkeypatch.setattr(rng, "CHUNK", 7)
    like, seed, offset = torch.empty(4, 5, dtype=dtype), 987654321, 13
    got = rng.uniform(like, torch.tensor(seed), offset)
    want = torch.from_numpy(rng.philox_uniform(
        seed, numpy.arange(offset, offset + like.numel())))
    digits = rng.HALF_DIGITS.get(dtype)
    if digits:
        want = torch.floor(want * 2.0 ** digits) * 2.0 ** -digits
    assert got.dtype == dtype and got.shape == like.shape
    assert torch.equal(got.float().flatten(), want.to(dtype).float())


def test_uniform_holds_a_bounded_transient_whatever_the_size(monkeypatch):
    """Philox in int64 torch ops holds several int64 temporaries per element;
    drawn in chunks, what the draw holds beyond its result is bounded by the
    chunk, not the tensor (a whole GPT-2 dropout input at once: gigabytes)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from measuring import profiled_peak
    from retrograd import rng
    monkeypatch.setattr(rng, "CHUNK", 1024)
    like, seed = torch.empty(16 * 1024), torch.tensor(5)
    peak = profiled_peak(lambda: rng.uniform(like, seed, 0))
    assert peak <= like.nbytes + 12 * 1024 * 8, peak
