"""transformers models with their library defaults, against eager.

The zoo (``tests/hf_zoo.py``) builds each architecture from its config with
random weights and every default kept but the sizes: the default attention
(SDPA), the default dropout, the loss computed by the model. Each test
compares a compiled model with eager PyTorch:

- fp32, both faces: loss and every parameter gradient, floor-relative
  (``max|got - ref| <= 1e-4 * max(max|ref|, 1e-3 * largest gradient)``);
- bf16 autocast, both faces: the compiled gradients no further from fp32 eager than
  eager's own bf16 gradients (x1.25, plus rounding slack);
- training mode with the default dropout, where eager's random stream cannot
  be matched: a float64 directional finite difference of the compiled loss
  under fixed seeds (retrograd's dropout masks are a pure function of a seed
  drawn from torch's generator) must equal the compiled gradient;
- ``compile_step`` with AdamW or SGD, parameters after three steps.

Models whose defaults train with dropout are compared in ``eval()`` mode
(dropout off; nothing else differs for these architectures). Where the
standalone face cannot trace a model as one graph (transformers' mask
helpers read tensor values as Python booleans), it hands the model to
dynamo (compiler/dynamo_fallback.py): the test checks the warning names the
source line, then checks the numbers as for every other model. The slowest
architectures are marked ``slow`` (``scripts/slow_tests.sh``); the default
run keeps decoders, an encoder, an encoder-decoder and a vision model.
"""

from __future__ import annotations

import pytest
import torch

import retrograd
from checks import assert_close_floor, eager_step
from hf_zoo import HF_ZOO

pytestmark = pytest.mark.filterwarnings("ignore")

#: models the standalone face hands to dynamo, and a piece of its warning
STANDALONE_SPLITS = {"bert": "masking_utils.py", "roberta": "masking_utils.py",
                      "bart": "masking_utils.py"}


def _param(name):
    entry = HF_ZOO[name]
    return pytest.param(name, marks=[pytest.mark.slow] if entry.slow else [])


NAMES = [_param(name) for name in HF_ZOO]


def _prepared(name, dtype=torch.float32):
    entry = HF_ZOO[name]
    model = entry.model().to(dtype)
    model.train(not entry.dropout(model))
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in entry.batch().items()}
    return model, batch


def _loss_and_grads(model, call, batch, autocast=None):
    parameters = [p for p in model.parameters() if p.requires_grad]
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        loss = call(**batch).loss
    return loss.detach(), torch.autograd.grad(loss, parameters, allow_unused=True)


def _compiled(model, face):
    torch._dynamo.reset()   # the standalone face may hand a model to dynamo, too
    if face == "standalone":
        return retrograd.compile(model)
    return torch.compile(model, backend="retrograd")


def _assert_gradients(got, expected, tolerance):
    scale = max(g.abs().max().item() for g in expected if g is not None)
    for i, (g, e) in enumerate(zip(got, expected)):
        if e is None:
            assert g is None or not g.any(), f"parameter {i}: eager has no gradient"
            continue
        assert_close_floor(g, e, tolerance, floor=1e-3 * scale, what=f"gradient {i}")


@pytest.mark.parametrize("face", ["standalone", "torch.compile"])
@pytest.mark.parametrize("name", NAMES)
def test_fp32_matches_eager(name, face):
    model, batch = _prepared(name)
    expected_loss, expected = _loss_and_grads(model, model, batch)
    compiled = _compiled(model, face)
    if face == "standalone" and name in STANDALONE_SPLITS:
        with pytest.warns(UserWarning, match=STANDALONE_SPLITS[name]):
            loss, got = _loss_and_grads(model, compiled, batch)
    else:
        loss, got = _loss_and_grads(model, compiled, batch)
    assert_close_floor(loss, expected_loss, 1e-5, what="loss")
    _assert_gradients(got, expected, 1e-4)


def _norm_error(got, ref) -> float:
    pairs = [(g, r) for g, r in zip(got, ref) if r is not None]
    error = sum(((g.double() - r.double()) ** 2).sum() for g, r in pairs) ** 0.5
    return (error / sum((r.double() ** 2).sum() for _, r in pairs) ** 0.5).item()


@pytest.mark.parametrize("face", ["standalone", "torch.compile"])
@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_no_worse_than_eager(name, face):
    model, batch = _prepared(name)
    _, exact = _loss_and_grads(model, model, batch)
    _, eager = _loss_and_grads(model, model, batch, autocast=torch.bfloat16)
    _, got = _loss_and_grads(model, _compiled(model, face), batch, autocast=torch.bfloat16)
    eager_error, our_error = _norm_error(eager, exact), _norm_error(got, exact)
    assert eager_error > 0, "autocast changed nothing: the test would prove nothing"
    assert our_error <= 1.25 * eager_error + 1e-3, (our_error, eager_error)


@pytest.mark.parametrize("name", ["gpt2", "bart", pytest.param("bert", marks=pytest.mark.slow)])
def test_training_mode_with_default_dropout(name):
    """float64, train mode, default dropout: the compiled gradient along a random
    direction equals the finite difference of the compiled model (same seeds, so
    the same masks in every evaluation). The objective is a fixed linear function
    of the float64 logits: transformers' own loss upcasts float32 logits, and
    that rounding would swamp the difference. (T5 is not among them: it computes
    its layer norms in float32 inside a float64 model, noise of the same order
    as the difference itself, in eager too.)"""
    model, batch = _prepared(name, torch.float64)
    model.train()
    assert HF_ZOO[name].dropout(model)
    labels = batch.pop("labels")
    if HF_ZOO[name].kind == "encoder-decoder":
        batch["decoder_input_ids"] = labels
    compiled = _compiled(model, "standalone")
    parameters = [p for p in model.parameters() if p.requires_grad]

    def objective(seed=7, function=compiled):
        torch.manual_seed(seed)
        logits = function(**batch).logits
        weights = torch.randn(logits.shape, dtype=logits.dtype,
                              generator=torch.Generator().manual_seed(0))
        return (logits * weights).sum()

    value = objective()
    grads = torch.autograd.grad(value, parameters, allow_unused=True)
    assert objective().item() == value.item(), "the same seed must give the same masks"
    assert objective(seed=8).item() != value.item(), "dropout must be active"

    torch.manual_seed(0)
    direction = [torch.randn_like(p) for p in parameters]
    along = sum((g * d).sum() for g, d in zip(grads, direction) if g is not None).item()
    epsilon = 1e-6
    with torch.no_grad():
        for p, d in zip(parameters, direction):
            p.add_(d, alpha=epsilon)
        plus = objective().item()
        for p, d in zip(parameters, direction):
            p.add_(d, alpha=-2 * epsilon)
        minus = objective().item()
        for p, d in zip(parameters, direction):
            p.add_(d, alpha=epsilon)
    finite_difference = (plus - minus) / (2 * epsilon)
    assert abs(along - finite_difference) <= 1e-6 * max(abs(finite_difference), 1.0), \
        (along, finite_difference)


SGD = lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9, weight_decay=1e-2)  # noqa
ADAMW = lambda params: torch.optim.AdamW(params, lr=1e-2)  # noqa: E731


@pytest.mark.parametrize("name, optimizer", [
    # GPT-2's key bias has a mathematically zero gradient (softmax ignores a
    # constant per row): Adam would turn its rounding noise into steps of lr
    ("gpt2", SGD), ("llama", ADAMW), pytest.param("t5", ADAMW, marks=pytest.mark.slow)])
def test_compile_step_matches_eager_loop(name, optimizer):
    model, batch = _prepared(name)
    reference = HF_ZOO[name].model()
    reference.load_state_dict(model.state_dict())
    reference.train(model.training)

    def loss_fn(m, batch):
        return m(**batch).loss

    start = [p.detach().clone() for p in model.parameters()]
    step = retrograd.compile_step(model, loss_fn, optimizer(model.parameters()))
    eager_optimizer = optimizer(reference.parameters())
    for _ in range(3):
        loss = step(batch)
        expected = eager_step(reference, eager_optimizer, loss_fn, batch)
        assert_close_floor(loss.detach(), expected.detach(), 1e-5, what="loss")
    # each parameter relative to how far the eager optimizer moved it
    for (name_, got), expected, before in zip(model.named_parameters(),
                                              reference.parameters(), start):
        moved = (expected.detach() - before).abs().max().item()
        assert_close_floor(got, expected, 1e-3 * max(moved, 1e-2) / max(
            expected.abs().max().item(), 1e-12), what=name_)
