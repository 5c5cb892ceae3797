"""The fused linear + cross-entropy (passes/linear_cross_entropy.py,
compiler/loss_ops.py): found in the joint graph, loss and gradients equal to
eager's (float64 reference), the logits never held, every variant the pass
claims (bias, tied weight, causal shift and flatten, ignore_index, mean /
sum / none, class weights, chunk boundaries), the ones it leaves alone with their reason
(logits returned, label smoothing), both faces, bf16 autocast, compile_step,
and graphs without the pattern unchanged by holding the ops back."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

import retrograd
import retrograd.capture
import retrograd.decompositions
from retrograd import loss_ops
from retrograd.passes import linear_cross_entropy as lce
from checks import assert_close_floor, check_against_eager, compile_with, eager_step
import hf_zoo
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


def smoothed(h, w, b, y):
    return F.cross_entropy(F.linear(h, w, b).reshape(-1, VOCAB), y.reshape(-1),
                           label_smoothing=0.1)


def smoothed_shift_sum(h, w, b, y):
    logits = F.linear(h, w, b)[:, :-1]
    return F.cross_entropy(logits.reshape(-1, VOCAB), y[:, 1:].reshape(-1),
                           label_smoothing=0.2, reduction="sum")


def smoothed_per_row(h, w, y):
    return F.cross_entropy(F.linear(h, w).reshape(-1, VOCAB), y.reshape(-1),
                           label_smoothing=0.3, reduction="none")


def soft_capped(h, w, b, y):
    """Gemma 2's final soft cap, 30 * tanh(logits / 30), with the causal shift;
    the weight scaled up so the cap bends the logits."""
    logits = F.linear(h, w * 20, b)
    logits = (torch.tanh(logits / 30.0) * 30.0)[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, VOCAB), y[:, 1:].reshape(-1), label_smoothing=0.1)


CLASS_WEIGHTS = torch.rand(VOCAB, generator=torch.Generator().manual_seed(9)) + 0.5


def class_weighted(h, w, b, y):
    """Class weights (a constant: nll_loss has no gradient for them), mean:
    the weighted terms over the sum of the rows' weights."""
    return F.cross_entropy(F.linear(h, w, b).reshape(-1, VOCAB), y.reshape(-1),
                           weight=CLASS_WEIGHTS.to(h.dtype))


def class_weighted_shift_per_row(h, w, y):
    logits = F.linear(h, w)[:, :-1]
    return F.cross_entropy(logits.reshape(-1, VOCAB), y[:, 1:].reshape(-1),
                           weight=CLASS_WEIGHTS.to(h.dtype), reduction="none")


@pytest.mark.parametrize("fn", [plain, with_bias, causal_shift, summed, per_row, smoothed,
                                smoothed_shift_sum, smoothed_per_row, soft_capped,
                                class_weighted, class_weighted_shift_per_row])
def test_fused_loss_and_gradients_match_eager(fn):
    hidden, weight, bias, target = _inputs()
    with_bias = fn.__code__.co_argcount == 4
    compiled = check_against_eager(fn, hidden, weight, *([bias] if with_bias else []), target)
    for half in ("forward", "backward"):
        stats = _stats(compiled, half)
        assert stats["fused"] == 1 and stats["left_alone"] == [], stats
    ops = compiled.reports["forward"]["kernels"]["extern_ops"]
    assert "retrograd.linear_cross_entropy.default" in ops, ops


@pytest.mark.parametrize("chunk_bytes, budget, chunk_rows", [
    (3 * VOCAB * 4, None, 3), (1, None, 1), (6 * VOCAB * 4, 0.5, 3), (10**9, None, 8)])
def test_chunks_follow_the_byte_cap_and_the_budget(monkeypatch, chunk_bytes, budget,
                                                   chunk_rows):
    """8 rows in chunks of 3 (a ragged last chunk), of one row, of 3 where the
    budget halves a 6-row cap, and all 8 in one where the cap is not reached."""
    monkeypatch.setattr(lce, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(lce, "MIN_CHUNKS", 1)
    compiled = check_against_eager(causal_shift, *_inputs(1), memory_budget=budget)
    assert _stats(compiled)["chunk_rows"] == [chunk_rows]


def test_default_chunks_are_an_eighth_of_the_rows_at_most():
    assert _stats(check_against_eager(causal_shift, *_inputs(1)))["chunk_rows"] == [1]


def test_fused_ops_alone_against_float64_eager():
    """The custom ops with a ragged chunk, every reduction, an ignored row,
    with and without class weights."""
    hidden, weight, bias, target = _inputs(2)
    hidden = hidden.reshape(-1, WIDTH).double()
    weight, bias = weight.double(), bias.double()
    for (reduction, code), classes in itertools.product(
            (("none", 0), ("mean", 1), ("sum", 2)), (None, CLASS_WEIGHTS.double())):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        ref = F.cross_entropy(F.linear(h, w, b), target.reshape(-1), reduction=reduction,
                              weight=classes)
        grad_out = torch.randn(ref.shape, dtype=torch.float64)
        ref.backward(grad_out)
        loss, lse, _ = loss_ops.linear_cross_entropy(hidden, weight, bias, target.reshape(-1),
                                                     classes, code, -100, torch.float64, 3, 0.0)
        grads = loss_ops.linear_cross_entropy_backward(grad_out, hidden, weight, bias,
                                                       target.reshape(-1), classes, lse, None,
                                                       code, -100, torch.float64, 3, 0.0, True,
                                                       True)
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


def log_probabilities_read(h, w, b, y):
    log_probabilities = F.log_softmax(F.linear(h, w, b).reshape(-1, VOCAB), -1)
    return F.nll_loss(log_probabilities, y.reshape(-1)) + log_probabilities.mean()


def vocabulary_cut(h, w, b, y):
    """Only the first 40 classes are scored: a slice of the vocabulary dim."""
    logits = F.linear(h, w, b)[..., :40]
    return F.cross_entropy(logits.reshape(-1, 40), (y % 40).reshape(-1))


def one_sample(h, w, b, y):
    """One row's logits as a vector and a 0-d target: not rows x vocabulary."""
    logits = F.linear(h.reshape(-1, WIDTH)[:1], w, b).reshape(-1)
    return F.cross_entropy(logits, y.reshape(-1)[0].clamp_min(0))


@pytest.mark.parametrize("fn, reason", [(escaping, "logits read elsewhere"),
                                        (one_sample, "rank 1"),
                                        (vocabulary_cut, "cuts the vocabulary dim"),
                                        (log_probabilities_read,
                                         "log-probabilities read elsewhere")])
def test_left_alone_with_its_reason_and_right_numbers(fn, reason):
    compiled = check_against_eager(fn, *_inputs(5))
    stats = _stats(compiled)
    assert stats["fused"] == 0 and len(stats["left_alone"]) == 1, stats
    assert reason in stats["left_alone"][0], stats
    restored = next(p["stats"] for p in compiled.reports["forward"]["passes"]
                    if p["name"] == "restore_decompositions")
    assert restored["decomposed"] == 4


def _ops(gm) -> list:
    return [(str(n.target), tuple(n.meta["val"].shape)
             if isinstance(n.meta.get("val"), torch.Tensor) else None)
            for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("fn", [smoothed, escaping])
def test_ops_held_back_then_restored_give_the_graph_of_the_full_table(monkeypatch, fn):
    """Where no pattern is fused, holding the four ops back changes nothing:
    after restore the joint graph has the very ops (and shapes) tracing with
    the whole table gives, so every later pass and kernel is as before."""
    class Module(torch.nn.Module):
        def forward(self, *args):
            result = fn(*args)
            return result if isinstance(result, tuple) else (result,)

    hidden, weight, bias, target = (t.requires_grad_(t.is_floating_point())
                                    for t in _inputs(6))
    held, _, _ = retrograd.capture.joint_graph(Module(), [hidden, weight, bias, target])
    assert any(n.target in retrograd.decompositions.HELD for n in held.graph.nodes)
    restored = loss_ops.restore(held, None).subject
    full = retrograd.decompositions.decomposition_table(full_table=True)
    monkeypatch.setattr(retrograd.capture, "decompositions_for", lambda *args: full)
    reference, _, _ = retrograd.capture.joint_graph(Module(), [hidden, weight, bias, target])
    assert _ops(restored) == _ops(reference)


def test_saved_bytes_drop_by_the_logits_and_the_backward_never_holds_them():
    """A logits-dominated model (V = 1024, width 8, 16 rows): the fused program
    saves at least rows x V x 4 bytes less than the unfused one (less the
    rows x 4 of the logsumexp it saves in their place), and its
    backward arena is smaller than one rows x V float32 tensor."""
    torch.manual_seed(7)
    vocab, ids = 1024, torch.randint(0, 1024, (2, 9))
    model = TiedLM(vocab, WIDTH)
    logits_bytes = 2 * 8 * vocab * 4
    memory = {}
    for disable in ((), ("linear_cross_entropy",)):
        compiled = retrograd.compile(lambda ids: _lm_loss(model, ids), executor="interpret",
                                     disable=disable)
        compiled(ids).backward()
        memory[disable] = [compiled.reports[h]["memory"] for h in ("forward", "backward")]
    fused, unfused = memory[()], memory[("linear_cross_entropy",)]
    lse_bytes = 2 * 8 * 4   # the fused op saves each row's float32 logsumexp instead
    assert fused[0]["saved_activation_bytes"] + logits_bytes \
        <= unfused[0]["saved_activation_bytes"] + lse_bytes, (fused, unfused)
    assert fused[1]["arena_bytes"] < logits_bytes <= unfused[1]["arena_bytes"], (fused, unfused)


@pytest.fixture
def long_batch(monkeypatch):
    """hf_zoo's batches at 24 tokens instead of 8: with 2 x 8 tokens the
    logits (96 words) are smaller than the weight gradient the fusion keeps,
    and the pass rightly leaves them alone (see the test below)."""
    monkeypatch.setattr(hf_zoo, "TOKENS", 24)


def test_logits_smaller_than_the_weight_gradient_are_left_alone():
    """14 rows of 64 words at width 32 (zoo gpt2_tiny's shape): the logits and
    their gradient (7 KiB) weigh less than the float32 weight gradient (8 KiB)
    the fused backward would keep outside the arena; left alone, with the
    reason and right numbers. Without gradients the forward is still fused."""
    torch.manual_seed(12)
    hidden, weight = torch.randn(2, 8, 32), torch.randn(64, 32) / 3
    bias, target = torch.randn(64), torch.randint(0, 64, (2, 8))

    def shifted(h, w, b, y):
        logits = F.linear(h, w, b)[:, :-1]
        return F.cross_entropy(logits.reshape(-1, 64), y[:, 1:].reshape(-1))
    compiled = check_against_eager(shifted, hidden, weight, bias, target)
    stats = _stats(compiled)
    assert stats["fused"] == 0 and "no larger than the weight gradient" in \
        stats["left_alone"][0], stats
    inference = retrograd.compile(shifted, executor="interpret")
    with torch.no_grad():
        inference(hidden, weight, bias, target)
    assert _stats(inference)["fused"] == 1


def _gpt2(autocast=None):
    """tests/hf_zoo.py's GPT-2 returning its loss alone (so the logits do not
    escape); ``loss_type`` set so transformers' one-time warning about it
    does not break dynamo's graph before the loss. Use with ``long_batch``."""
    entry = next(e for e in ENTRIES if e.name == "gpt2")
    model = entry.model().eval()
    model.loss_type = "ForCausalLM"

    def loss(input_ids, labels):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
            return model(input_ids=input_ids, labels=labels).loss
    return model, loss, entry.batch()


def _record_fused(monkeypatch) -> list:
    """The ``fused`` count of every linear_cross_entropy run, in order (either face)."""
    fused, run = [], lce.run

    def recorded(gm, ctx):
        result = run(gm, ctx)
        fused.append(result.stats["fused"])
        return result
    monkeypatch.setattr(lce, "run", recorded)
    return fused


def _grads(model, fn, batch):
    loss = fn(**batch)
    return loss.detach(), torch.autograd.grad(loss, list(model.parameters()))


@pytest.mark.parametrize("face", ["standalone", "torch.compile"])
def test_gpt2_loss_is_fused_and_matches_eager(face, monkeypatch, long_batch):
    model, loss_fn, batch = _gpt2()
    expected_loss, expected = _grads(model, loss_fn, batch)
    torch._dynamo.reset()
    fused = _record_fused(monkeypatch)
    compiled = compile_with(face, loss_fn, executor="interpret")
    loss, got = _grads(model, compiled, batch)
    assert_close_floor(loss, expected_loss, 1e-5, what="loss")
    scale = max(g.abs().max().item() for g in expected)
    for g, e in zip(got, expected):
        assert_close_floor(g, e, 1e-4, floor=1e-3 * scale, what="gradient")
    assert fused == [1], fused   # one joint graph, its one pattern fused


@pytest.mark.parametrize("face", ["standalone", "torch.compile"])
def test_gpt2_bf16_autocast_no_worse_than_eager(face, monkeypatch, long_batch):
    """As the zoo compares bf16: no further from fp32 eager than eager bf16 is."""
    model, loss_fn, batch = _gpt2()
    _, exact = _grads(model, loss_fn, batch)
    model, loss_fn, batch = _gpt2(torch.bfloat16)
    _, eager = _grads(model, loss_fn, batch)
    torch._dynamo.reset()
    fused = _record_fused(monkeypatch)
    _, got = _grads(model, compile_with(face, loss_fn, executor="interpret"), batch)
    assert fused == [1], fused

    def error(grads):
        num = sum(((g.double() - r.double()) ** 2).sum() for g, r in zip(grads, exact))
        return (num ** 0.5 / sum((r.double() ** 2).sum() for r in exact) ** 0.5).item()
    assert 0 < error(eager) and error(got) <= 1.25 * error(eager) + 1e-3, (error(got),
                                                                           error(eager))


@pytest.mark.parametrize("loss_fn", ["causal_shift", "olmo"])
def test_inference_fuses_the_forward_half(loss_fn):
    """Without gradients (an evaluation loss) the forward alone is fused; with
    OLMo's z-loss, z is taken from the fused forward's logsumexp too."""
    import test_z_loss
    loss_fn = causal_shift if loss_fn == "causal_shift" else test_z_loss.olmo
    hidden, weight, bias, target = _inputs(8)
    compiled = retrograd.compile(loss_fn, executor="interpret")
    with torch.no_grad():
        loss = compiled(hidden, weight, bias, target)
        expected = loss_fn(hidden.double(), weight.double(), bias.double(), target)
    assert_close_floor(loss, expected, 1e-6, what="loss")
    assert _stats(compiled)["fused"] == 1


def test_verify_checks_the_fused_graph():
    """verify=True runs every pass's output on real tensors: the fused ops too."""
    check_against_eager(with_bias, *_inputs(9), verify=True)


def test_a_frozen_weight_gets_no_gradient_computed(tmp_path):
    """dead_gradient drops the frozen weight's product before this pass: the
    fused backward is told so (``weight_grad`` False) and computes no V x width
    gradient; hidden's gradient is still right."""
    torch.manual_seed(10)
    model, ids = TiedLM(), torch.randint(0, VOCAB, ROWS_3D)
    model.embed.weight.requires_grad_(False)
    twin = copy.deepcopy(model)
    _lm_loss(twin, ids).backward()
    compiled = retrograd.compile(lambda ids: _lm_loss(model, ids), executor="interpret",
                                 dump_dir=str(tmp_path))
    compiled(ids).backward()
    for got, want in zip(model.mix.parameters(), twin.mix.parameters()):
        assert_close_floor(got.grad, want.grad, 1e-5, what="gradient")
    assert _stats(compiled, "backward")["fused"] == 1
    graph = next(tmp_path.glob("*-backward/*_linear_cross_entropy.py")).read_text()
    call = next(line for line in graph.splitlines() if "linear_cross_entropy_backward" in line)
    assert "False, False)" in call, call


@pytest.mark.parametrize("name", ["llama", "bert", pytest.param("t5", marks=pytest.mark.slow)])
def test_other_transformers_losses_are_fused(name, monkeypatch, long_batch):
    """LLaMA (untied head), BERT's masked LM (a bias, the tied decoder, most
    rows ignored) and T5 (a rescaled tied head), each returning its loss alone:
    one pattern fused, gradients equal to eager's."""
    entry = next(e for e in ENTRIES if e.name == name)
    model, batch = entry.model().eval(), entry.batch()
    if entry.kind == "decoder":
        model.loss_type = "ForCausalLM"

    def loss_fn(**inputs):
        return model(**inputs).loss
    expected_loss, expected = _grads(model, loss_fn, batch)
    fused = _record_fused(monkeypatch)
    loss, got = _grads(model, retrograd.compile(loss_fn, executor="interpret"), batch)
    assert fused == [1], fused
    assert_close_floor(loss, expected_loss, 1e-5, what="loss")
    scale = max(g.abs().max().item() for g in expected)
    for g, e in zip(got, expected):
        assert_close_floor(g, e, 1e-4, floor=1e-3 * scale, what="gradient")


def test_fx_executor_runs_the_fused_ops():
    """executor="fx" (passes without codegen) runs the two custom ops as torch calls."""
    hidden, weight, bias, target = _inputs(11)
    compiled = retrograd.compile(causal_shift, executor="fx")
    mine = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    wide = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    loss, expected = compiled(*mine, target), causal_shift(*wide, target)
    loss.backward()
    expected.backward()
    assert_close_floor(loss.detach(), expected.detach(), 1e-6, what="loss")
    for got, want in zip(mine, wide):
        assert_close_floor(got.grad, want.grad, 1e-5, what="gradient")
    assert _stats(compiled)["fused"] == 1
