"""A z-loss beside the fused linear + cross-entropy (passes/matching/z_loss.py):
``coef * mean(logsumexp(logits, -1) ** 2)`` as PaLM writes it, and masked
and summed as OLMo does, reads its z values from the fused op's logsumexp
and adds ``g_z * softmax`` to the logits' gradient, so the logits stay
unheld; loss and gradients against float64 eager, both faces; the cases it
does not take left alone with their reason and right numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import retrograd
from retrograd import loss_ops
from retrograd.passes import linear_cross_entropy as lce
from checks import assert_close_floor, check_against_eager, compile_with
from test_linear_cross_entropy import _stats

ROWS_3D, WIDTH, VOCAB = (2, 5), 8, 50
COEF = 0.01   # larger than OLMo's 1e-4, so a wrong z gradient shows


def _inputs(seed=0):
    torch.manual_seed(seed)
    hidden, weight = torch.randn(*ROWS_3D, WIDTH), torch.randn(VOCAB, WIDTH)
    bias, target = torch.randn(VOCAB) + 2, torch.randint(0, VOCAB, ROWS_3D)
    target[0, 2] = target[1, 4] = -100
    return hidden, weight, bias, target


def palm(h, w, b, y):
    """PaLM: the mean cross-entropy plus coef * mean(z^2), every row."""
    logits = F.linear(h, w, b).reshape(-1, VOCAB)
    return F.cross_entropy(logits, y.reshape(-1)) + COEF * torch.logsumexp(
        logits, -1).square().mean()


def olmo(h, w, b, y):
    """OLMo: the causal shift and upcast, summed cross-entropy, z^2 summed
    over the rows that are not ignored (z taken first, the loss after)."""
    logits = F.linear(h, w, b)[:, :-1].float().reshape(-1, VOCAB)
    labels = y[:, 1:].reshape(-1)
    z = logits.logsumexp(-1)
    z_loss = (z.pow(2) * (labels != -100)).sum()
    return COEF * z_loss + F.cross_entropy(logits, labels, reduction="sum")


def three_d(h, w, y):
    """z of the 3-d logits (keepdim), the loss on their flattened view, smoothed."""
    logits = F.linear(h, w)
    z = torch.logsumexp(logits, dim=2, keepdim=True)
    return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), label_smoothing=0.1) \
        + COEF * (z ** 2).mean()


def capped(h, w, b, y):
    """Gemma 2's soft cap, then the z-loss of the (3-d) capped logits."""
    logits = torch.tanh(F.linear(h, w, b) / 5.0) * 5.0
    return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1)) + COEF * logits.logsumexp(
        -1).square().sum()


@pytest.mark.parametrize("fn", [palm, olmo, three_d, capped])
def test_z_loss_is_fused_against_float64_eager(fn):
    hidden, weight, bias, target = _inputs()
    args = (hidden, weight, bias, target) if fn.__code__.co_argcount == 4 else (
        hidden, weight, target)
    compiled = check_against_eager(fn, *args)
    for half in ("forward", "backward"):
        stats = _stats(compiled, half)
        assert stats["fused"] == 1 and stats["left_alone"] == [], stats
    ops = compiled.reports["forward"]["kernels"]["extern_ops"]
    assert "aten.logsumexp.default" not in ops, ops


@pytest.mark.parametrize("face", ["standalone", "torch.compile"])
def test_z_loss_both_faces(face, monkeypatch):
    fused, run = [], lce.run

    def recorded(gm, ctx):
        result = run(gm, ctx)
        fused.append(result.stats["fused"])
        return result
    monkeypatch.setattr(lce, "run", recorded)
    hidden, weight, bias, target = _inputs(1)
    wide = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    expected = olmo(*wide, target)
    expected.backward()
    mine = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    torch._dynamo.reset()
    loss = compile_with(face, olmo, executor="interpret")(*mine, target)
    loss.backward()
    assert_close_floor(loss.detach(), expected.detach(), 1e-6, what="loss")
    for got, want in zip(mine, wide):
        assert_close_floor(got.grad, want.grad, 1e-5, what="gradient")
    assert fused == [1], fused   # one joint graph, its pattern and z-loss fused


def test_fused_backward_z_grad_against_float64_eager():
    """The op alone: ``z_grad`` adds ``g_z * softmax`` (ignored rows too)."""
    hidden, weight, bias, target = _inputs(2)
    hidden, weight, bias = hidden.reshape(-1, WIDTH).double(), weight.double(), bias.double()
    target = target.reshape(-1)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    logits = F.linear(h, w, b)
    g_z = torch.randn(10, dtype=torch.float64)
    (F.cross_entropy(logits, target) + (torch.logsumexp(logits, -1) * g_z).sum()).backward()
    loss, lse, _ = loss_ops.linear_cross_entropy(hidden, weight, bias, target, None, 1, -100,
                                                 torch.float64, 3, 0.0)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target).detach())
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1).detach())
    grads = loss_ops.linear_cross_entropy_backward(
        torch.tensor(1.0, dtype=torch.float64), hidden, weight, bias, target, None, lse, None,
        1, -100, torch.float64, 3, 0.0, True, True, g_z)
    for got, want in zip(grads, (h.grad, w.grad, b.grad)):
        torch.testing.assert_close(got, want)


def before_the_shift(h, w, b, y):
    """z over every position, the loss over all but the last: other rows."""
    logits = F.linear(h, w, b)
    z = logits.logsumexp(-1)
    shifted = logits[:, :-1].reshape(-1, VOCAB)
    return F.cross_entropy(shifted, y[:, 1:].reshape(-1)) + COEF * z.square().mean()


def two_z(h, w, b, y):
    logits = F.linear(h, w, b).reshape(-1, VOCAB)
    return F.cross_entropy(logits, y.reshape(-1)) + COEF * (
        logits.logsumexp(-1).square().mean() + logits.logsumexp(1).abs().sum())


def z_of_other_dim(h, w, b, y):
    logits = F.linear(h, w, b).reshape(-1, VOCAB)
    return F.cross_entropy(logits, y.reshape(-1)) + COEF * logits.logsumexp(0).square().mean()


@pytest.mark.parametrize("fn, reason, decomposed", [
    (before_the_shift, "before a slice, a narrowing cast or the soft cap", 5),
    (two_z, "more than one logsumexp", 6),
    (z_of_other_dim, "logits read elsewhere", 5)])
def test_z_loss_left_alone_with_its_reason(fn, reason, decomposed):
    compiled = check_against_eager(fn, *_inputs(3))
    stats = _stats(compiled)
    assert stats["fused"] == 0 and reason in stats["left_alone"][0], stats
    restored = next(p["stats"] for p in compiled.reports["forward"]["passes"]
                    if p["name"] == "restore_decompositions")
    assert restored["decomposed"] == decomposed


def test_a_logsumexp_held_back_then_restored_gives_the_graph_of_the_full_table(monkeypatch):
    """aten.logsumexp is held back too (decompositions.HELD): where it is not
    fused, restore leaves the joint graph op for op as the full table traces it."""
    import retrograd.capture
    import retrograd.decompositions

    class Module(torch.nn.Module):
        def forward(self, *args):
            return (z_of_other_dim(*args),)

    inputs = [t.requires_grad_(t.is_floating_point()) for t in _inputs(4)]
    held, _, _ = retrograd.capture.joint_graph(Module(), inputs)
    assert any(n.target is torch.ops.aten.logsumexp.default for n in held.graph.nodes)
    restored = loss_ops.restore(held, None).subject
    full = retrograd.decompositions.decomposition_table(full_table=True)
    monkeypatch.setattr(retrograd.capture, "decompositions_for", lambda *args: full)
    reference, _, _ = retrograd.capture.joint_graph(Module(), inputs)

    def ops(gm):
        return [(str(n.target), tuple(n.meta["val"].shape)
                 if isinstance(n.meta.get("val"), torch.Tensor) else None)
                for n in gm.graph.nodes if n.op == "call_function"]
    assert ops(restored) == ops(reference)


def test_compile_step_fuses_the_z_loss():
    """In compile_step's one graph (a tied embedding LM, SGD): fused, and the
    parameters after the step equal eager's."""
    import copy

    from checks import eager_step
    from test_linear_cross_entropy import TiedLM

    def loss(model, ids):
        logits = model(ids)[:, :-1].reshape(-1, VOCAB)
        return F.cross_entropy(logits, ids[:, 1:].reshape(-1)) + COEF * logits.logsumexp(
            -1).square().mean()
    torch.manual_seed(4)
    model, ids = TiedLM(), torch.randint(0, VOCAB, ROWS_3D)
    twin = copy.deepcopy(model)
    step = retrograd.compile_step(model, loss, torch.optim.SGD(model.parameters(), lr=0.1),
                                  executor="interpret")
    got = step(ids)
    expected = eager_step(twin, torch.optim.SGD(twin.parameters(), lr=0.1), loss, ids)
    assert_close_floor(got.detach(), expected.detach(), 1e-6, what="loss")
    for mine, theirs in zip(model.parameters(), twin.parameters()):
        assert_close_floor(mine.detach(), theirs.detach(), 1e-5, what="parameter")
    stats = next(p["stats"] for p in step.reports["step"]["passes"]
                 if p["name"] == "linear_cross_entropy")
    assert stats["fused"] == 1 and stats["left_alone"] == [], stats


def autocast_bf16(h, w, b, y):
    """Under bf16 autocast z is taken from the bf16 logits, the loss from
    their fp32 upcast (autocast's log_softmax): a widening cast between."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=h.dtype != torch.float64):
        logits = F.linear(h, w, b).reshape(-1, VOCAB)
        return F.cross_entropy(logits, y.reshape(-1)) + COEF * logits.logsumexp(
            -1).square().mean()


def test_z_loss_under_bf16_autocast_no_worse_than_eager():
    """Fused (z of the bf16 logits from the fp32 logsumexp, cast to bf16),
    and loss and gradients no further from float64 than eager bf16's."""
    hidden, weight, bias, target = _inputs(6)
    wide = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    exact = autocast_bf16(*wide, target)
    exact_grads = torch.autograd.grad(exact, wide)

    def error(fn):
        mine = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        loss = fn(*mine, target)
        grads = torch.autograd.grad(loss, mine)
        num = sum(((g.double() - r) ** 2).sum() for g, r in zip(grads, exact_grads))
        den = sum((r ** 2).sum() for r in exact_grads)
        return abs(loss.item() - exact.item()), (num / den).sqrt().item()
    compiled = retrograd.compile(autocast_bf16, executor="interpret")
    (loss_error, grad_error), (eager_loss, eager_grad) = error(compiled), error(autocast_bf16)
    assert _stats(compiled)["fused"] == 1, _stats(compiled)
    assert 0 < eager_grad and grad_error <= 1.25 * eager_grad + 1e-3, (grad_error, eager_grad)
    assert loss_error <= 1.25 * eager_loss + 1e-3 * exact.abs().item(), (loss_error, eager_loss)
