"""Cut Cross-Entropy kernels (codegen/cce.py, compiler/cce_ops.py) under the interpreter.

The fused linear + cross-entropy runs the CCE kernels where chosen
(``matmul_templates=True`` on the CPU); loss and gradients are compared with
float64 eager on the pattern variants of test_linear_cross_entropy.py, and
the ops alone with loss_ops' chunked ops in float64 on odd sizes (rows and
vocabulary not multiples of the blocks, ignored rows, label smoothing's row
gradient, a soft cap, a z-loss gradient, class weights, frozen weight).
"""

from __future__ import annotations

import pytest
import torch

from retrograd import cce_ops, loss_ops
from retrograd.pipeline import OpSupport
from checks import check_against_eager
from test_linear_cross_entropy import (_inputs, _stats, causal_shift, class_weighted, plain,
                                       smoothed_shift_sum, soft_capped, with_bias)


@pytest.mark.parametrize("fn", [plain, with_bias, causal_shift, smoothed_shift_sum, soft_capped,
                                class_weighted])
def test_cce_loss_and_gradients_match_eager(fn):
    hidden, weight, bias, target = _inputs()
    with_b = fn.__code__.co_argcount == 4
    compiled = check_against_eager(fn, hidden, weight, *([bias] if with_b else []), target,
                                   matmul_templates=True)
    stats = _stats(compiled)
    assert [k["kernel"] for k in stats["kernels"]] == ["cce"], stats
    ops = compiled.reports["forward"]["kernels"]["extern_ops"]
    assert "retrograd.linear_cross_entropy_cce.default" in ops, ops
    backward = compiled.reports["backward"]["kernels"]["extern_ops"]
    assert "retrograd.linear_cross_entropy_cce_backward.default" in backward, backward


def test_cpu_default_keeps_the_chunked_ops_and_says_why():
    compiled = check_against_eager(plain, *_inputs()[:2], _inputs()[3])
    [record] = _stats(compiled)["kernels"]
    assert record["kernel"] == "chunked" and record["why"].startswith("cpu")


def _case(rows, vocab, width, bias, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, generator=generator, dtype=torch.float64)
    weight = torch.randn(vocab, width, generator=generator, dtype=torch.float64) / 2
    b = torch.randn(vocab, generator=generator, dtype=torch.float64) if bias else None
    target = torch.randint(0, vocab, (rows,), generator=generator)
    target[::4] = -100
    return hidden, weight, b, target


def _f32(value):
    return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() \
        else value


@pytest.mark.parametrize("rows, vocab, width, bias, softcap, weighted, reduction", [
    (13, 37, 10, True, 0.0, False, loss_ops.MEAN),     # odd everything
    (70, 20, 33, False, 3.0, True, loss_ops.SUM),      # several row blocks, a cap
    (9, 90, 17, True, 0.0, True, 0),                   # several vocabulary blocks, per row
])
def test_cce_ops_match_the_chunked_ops_in_float64(rows, vocab, width, bias, softcap, weighted,
                                                  reduction):
    hidden, weight, b, target = _case(rows, vocab, width, bias)
    class_weight = torch.rand(vocab, dtype=torch.float64) + 0.5 if weighted else None
    common = (target, class_weight, reduction, -100)
    ref = loss_ops.linear_cross_entropy(hidden, weight, b, *common, torch.float64, 4, softcap)
    got = cce_ops.linear_cross_entropy_cce(*map(_f32, (hidden, weight, b)), target,
                                           _f32(class_weight), reduction, -100, torch.float32,
                                           4, softcap)
    for name, g, r in zip(("loss", "lse", "row sums"), got, ref):
        torch.testing.assert_close(g.double(), r, rtol=2e-5, atol=2e-5 * r.abs().max(),
                                   msg=name)
    grad = torch.rand(ref[0].shape, dtype=torch.float64)
    row_grad = torch.randn(rows, dtype=torch.float64)
    z_grad = torch.randn(rows, dtype=torch.float64)
    ref_grads = loss_ops.linear_cross_entropy_backward(
        grad, hidden, weight, b, target, class_weight, ref[1], row_grad, reduction, -100,
        torch.float64, 4, softcap, True, bias, z_grad)
    got_grads = cce_ops.linear_cross_entropy_cce_backward(
        *map(_f32, (grad, hidden, weight, b)), target, _f32(class_weight), got[1],
        row_grad.float(), reduction, -100, torch.float32, 4, softcap, True, bias, z_grad.float())
    for name, g, r in zip(("hidden", "weight", "bias"), got_grads, ref_grads):
        assert g.shape == r.shape, name
        if r.numel():
            torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5 * r.abs().max(),
                                       msg=name)


def test_frozen_weight_gets_no_gradient_and_hidden_is_right():
    hidden, weight, _, target = _case(11, 21, 6, False)
    _, lse, _ = loss_ops.linear_cross_entropy(hidden, weight, None, target, None, 1, -100,
                                              torch.float64, 4, 0.0)
    one = torch.tensor(1.0, dtype=torch.float64)
    ref = loss_ops.linear_cross_entropy_backward(one, hidden, weight, None, target, None, lse,
                                                 None, 1, -100, torch.float64, 4, 0.0, False,
                                                 False)
    got = cce_ops.linear_cross_entropy_cce_backward(one.float(), hidden.float(), weight.float(),
                                                    None, target, None, lse.float(), None, 1,
                                                    -100, torch.float32, 4, 0.0, False, False)
    assert got[1].numel() == 0 and got[2].numel() == 0
    torch.testing.assert_close(got[0].double(), ref[0], rtol=1e-4, atol=1e-6)


class _Timer:
    def __init__(self, times):
        self.times, self.calls = list(times), 0

    def __call__(self, function) -> float:
        self.calls += 1
        return self.times.pop(0) if self.times else 99.0


def test_autotune_record_and_cache_hit(monkeypatch, tmp_path):
    """The choice's bookkeeping with a stand-in timer (the interpreter is no
    measure of speed): chunked 5 ms, configs 6, 2, 3 ms -> CCE with the
    second config; a second compile reads the record and times nothing."""
    monkeypatch.setenv("RETROGRAD_CACHE_DIR", str(tmp_path))
    timer = _Timer([5.0, 6.0, 2.0, 3.0])

    def choose(options, rows, vocab, width, dtype, logits_dtype, has_bias, device, chunk_rows):
        return cce_ops.autotune(rows, vocab, width, dtype, logits_dtype, has_bias, device,
                                chunk_rows, timer=timer)
    monkeypatch.setattr(OpSupport, "choose_cce", staticmethod(choose))
    hidden, weight, bias, target = _inputs()
    compiled = check_against_eager(with_bias, hidden, weight, bias, target)
    [record] = _stats(compiled)["kernels"]
    assert record["kernel"] == "cce" and record["cache"] == "miss"
    assert record["chunked_ms"] == 5.0 and [t["ms"] for t in record["tried"]] == [6.0, 2.0, 3.0]
    assert record["config"] == dict(cce_ops.CONFIGS[1])
    calls = timer.calls
    again = check_against_eager(with_bias, hidden, weight, bias, target)
    [record] = _stats(again)["kernels"]
    assert record["cache"] == "hit" and timer.calls == calls
