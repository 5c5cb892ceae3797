"""The fused linear + cross-entropy (passes/linear_cross_entropy.py,
compiler/loss_ops.py): found in the joint graph, loss and gradients equal to
eager's (float64 reference), the logits never held, every variant the pass
claims (bias, tied weight, causal shift and flatten, ignore_index, mean /
sum / none, chunk boundaries), the ones it leaves alone with their reason
(logits returned, label smoothing), both faces, bf16 autocast, compile_step,
and graphs without the pattern unchanged by holding the ops back."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import retrograd
import retrograd.capture
import retrograd.decompositions
from retrograd import loss_ops
from retrograd.passes import linear_cross_entropy as lce
from checks import assert_close_floor, check_against_eager, compile_with, eager_step
from hf_zoo import ENTRIES

ROWS_3D, WIDTH, VOCAB = (2, 5), 8, 50


def _stats(compiled, half="forward") -> dict:
    passes = compiled.reports[half]["passes"]
    return next(p["stats"] for p in passes if p["name"] == "linear_cross_entropy")


def _inputs(seed=0, ignore=True):
    torch.manual_seed(seed)
    hidden, weight = torch.randn(*ROWS_3D, WIDTH), torch.randn(VOCAB, WIDTH) / 3
    bias, target = torch.randn(VOCAB), torch.randint(0, VOCAB, ROWS_3D)
    if ignore:
        target[0, 2] = target[1, 4] = -100
    return hidden, weight, bias, target


def plain(h, w, y):
    return F.cross_entropy(h.reshape(-1, WIDTH) @ w.t(), y.reshape(-1))


def with_bias(h, w, b, y):
    return F.cross_entropy(F.linear(h, w, b).reshape(-1, VOCAB), y.reshape(-1))


def causal_shift(h, w, b, y):
    """GPT-style: the logits of every position but the last, flattened, upcast."""
    logits = F.linear(h, w, b)[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, VOCAB), y[:, 1:].reshape(-1))


def summed(h, w, y):
    return F.cross_entropy(F.linear(h, w).reshape(-1, VOCAB), y.reshape(-1), reduction="sum")


def per_row(h, w, b, y):
    """reduction none, and an ignore_index of the user's (7: ignored rows and
    real targets 7 alike)."""
    y = torch.where(y < 0, 7, y)
    return F.cross_entropy(F.linear(h, w, b).reshape(-1, VOCAB), y.reshape(-1),
                           reduction="none", ignore_index=7)


@pytest.mark.parametrize("fn", [plain, with_bias, causal_shift, summed, per_row])
def test_fused_loss_and_gradients_match_eager(fn):
    hidden, weight, bias, target = _inputs()
    with_bias = fn.__code__.co_argcount == 4
    compiled = check_against_eager(fn, hidden, weight, *([bias] if with_bias else []), target)
    for half in ("forward", "backward"):
        stats = _stats(compiled, half)
        assert stats["fused"] == 1 and stats["left_alone"] == [], stats
    ops = compiled.reports["forward"]["kernels"]["extern_ops"]
    assert "retrograd.linear_cross_entropy.default" in ops, ops


@pytest.mark.parametrize("chunk_bytes, chunk_rows", [(3 * VOCAB * 4, 3), (1, 1)])
def test_chunks_not_dividing_the_rows(monkeypatch, chunk_bytes, chunk_rows):
    """8 rows in chunks of 3 (a ragged last chunk) and of one row."""
    monkeypatch.setattr(lce, "CHUNK_BYTES", chunk_bytes)
    compiled = check_against_eager(causal_shift, *_inputs(1))
    assert _stats(compiled)["chunk_rows"] == [chunk_rows]


def test_fused_ops_alone_against_float64_eager():
    """The custom ops with a ragged chunk, every reduction, an ignored row."""
    hidden, weight, bias, target = _inputs(2)
    hidden = hidden.reshape(-1, WIDTH).double()
    weight, bias = weight.double(), bias.double()
    for reduction, code in (("none", 0), ("mean", 1), ("sum", 2)):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        ref = F.cross_entropy(F.linear(h, w, b), target.reshape(-1), reduction=reduction)
        grad_out = torch.randn(ref.shape, dtype=torch.float64)
        ref.backward(grad_out)
        loss, lse = loss_ops.linear_cross_entropy(hidden, weight, bias, target.reshape(-1),
                                                  code, -100, torch.float64, 3)
        grads = loss_ops.linear_cross_entropy_backward(grad_out, hidden, weight, bias,
                                                       target.reshape(-1), lse, code, -100,
                                                       torch.float64, 3)
        torch.testing.assert_close(loss, ref.detach())
        for got, want in zip(grads, (h.grad, w.grad, b.grad)):
            torch.testing.assert_close(got, want)


class TiedLM(torch.nn.Module):
    """The embedding's weight is also the output projection: gradients add up."""

    def __init__(self, vocab=VOCAB, width=WIDTH):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.mix = torch.nn.Linear(width, width)

    def forward(self, ids):
        return F.linear(torch.tanh(self.mix(self.embed(ids))), self.embed.weight)


def _lm_loss(model, ids):
    logits = model(ids)[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("face", ["standalone", "torch.compile"])
def test_tied_embedding_weight(face):
    torch.manual_seed(3)
    model, ids = TiedLM().double(), torch.randint(0, VOCAB, ROWS_3D)
    _lm_loss(model, ids).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    ours = copy.deepcopy(model).float()
    for p in ours.parameters():
        p.grad = None
    torch._dynamo.reset()
    loss = compile_with(face, lambda ids: _lm_loss(ours, ids), executor="interpret")(ids)
    loss.backward()
    for got, want in zip(ours.parameters(), expected):
        assert_close_floor(got.grad, want, 1e-5, what="gradient")


def test_compile_step_fuses_in_the_step_graph():
    torch.manual_seed(4)
    model, ids = TiedLM(), torch.randint(0, VOCAB, ROWS_3D)
    twin = copy.deepcopy(model)
    step = retrograd.compile_step(model, lambda m, x: _lm_loss(m, x),
                                  torch.optim.SGD(model.parameters(), lr=0.1),
                                  executor="interpret")
    loss = step(ids)
    expected = eager_step(twin, torch.optim.SGD(twin.parameters(), lr=0.1),
                          lambda m, x: _lm_loss(m, x), ids)
    assert_close_floor(loss.detach(), expected.detach(), 1e-6, what="loss")
    for got, want in zip(model.parameters(), twin.parameters()):
        assert_close_floor(got.detach(), want.detach(), 1e-5, what="parameter")
    stats = next(p["stats"] for p in step.reports["step"]["passes"]
                 if p["name"] == "linear_cross_entropy")
    assert stats["fused"] == 1


def escaping(h, w, b, y):
    logits = F.linear(h, w, b)
    return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1)), logits


def smoothed(h, w, b, y):
    return F.cross_entropy(F.linear(h, w, b).reshape(-1, VOCAB), y.reshape(-1),
                           label_smoothing=0.1)


@pytest.mark.parametrize("fn, reason", [(escaping, "logits read elsewhere"),
                                        (smoothed, "log-probabilities read elsewhere")])
def test_left_alone_with_its_reason_and_right_numbers(fn, reason):
    compiled = check_against_eager(fn, *_inputs(5))
    stats = _stats(compiled)
    assert stats["fused"] == 0 and len(stats["left_alone"]) == 1, stats
    assert reason in stats["left_alone"][0], stats
    restored = next(p["stats"] for p in compiled.reports["forward"]["passes"]
                    if p["name"] == "restore_decompositions")
    assert restored["decomposed"] == 4
