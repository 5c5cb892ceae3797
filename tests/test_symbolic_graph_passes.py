"""Graph passes and report entries of symbolic programs (compiler/symbolic_passes.py):
dead_gradient and cleanup run on symbolic graphs without fixing a size; offload and
CUDA graphs never run there, and the report says so."""

from __future__ import annotations

import warnings

import pytest
import retrograd
import torch
from checks import assert_close, eager_step
from retrograd import symbolic_passes
from retrograd.passes import cleanup
from symbolic_models import mlp as _model
from symbolic_models import mse as _loss

pytestmark = pytest.mark.usefixtures("cache")


def _record(report: dict, name: str) -> dict:
    (record,) = [p for p in report["passes"] if p["name"] == name]
    return record


def _mm(report: dict) -> int:
    return report["kernels"]["extern_ops"].get("aten.mm.default", 0)


def product(x, w):
    return (x @ w).tanh().sum()


def test_grad_of_one_argument_computes_no_other_gradient_at_symbolic_sizes():
    """Before: the symbolic program computed w's gradient too (2 mm in its backward)."""
    compiled = retrograd.grad(product, argnums=0, executor="interpret")
    torch.manual_seed(0)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    for rows in (2, 3, 7):
        x = torch.randn(rows, 4, dtype=torch.float64)
        got = compiled(x, w)
        expected = torch.func.grad(product)(x, w.detach())
        assert_close(got, expected, torch.float64, what="gradient")
    backward = compiled._cache.last.compiler.reports["backward"]
    assert backward["symbolic"]["dims"] == "input 0 dim 0"
    assert _mm(backward) == 1   # x's gradient only: grad @ w.T
    stats = _record(backward, "dead_gradient")["stats"]
    assert stats["unwanted_gradients"] == 1 and stats["gradient_bytes_never_computed"] == 96
    assert w.grad is None


def _frozen_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8),
                                torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    model[2].requires_grad_(False)
    return model


def test_a_frozen_layer_gets_no_gradient_and_cleanup_runs_at_symbolic_sizes():
    model, reference = _frozen_model(), _frozen_model()
    compiled = retrograd.compile(model, executor="interpret")
    static_mm = None
    for rows in (2, 3, 6):
        x = torch.randn(rows, 4, dtype=torch.float64)
        assert_close(compiled(x).sum(), reference(x).sum(), torch.float64)
        compiled(x).pow(2).sum().backward()
        reference(x).pow(2).sum().backward()
        if rows == 2:
            static_mm = _mm(compiled.reports["backward"])
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if b.grad is not None:
            assert_close(a.grad, b.grad, torch.float64, what=name)
    backward = compiled.reports["backward"]
    assert "symbolic" in backward
    # the frozen layer's weight gradient is never computed: as many mm as the static program
    assert _mm(backward) == static_mm == 4
    assert "skipped" not in _record(backward, "cleanup")["stats"]
    assert _record(backward, "cleanup")["stats"]["no_op_views_removed"] > 0
    assert _record(backward, "dead_gradient")["stats"]["nodes_removed"] == 0


def test_the_graph_passes_add_no_shape_guard():
    """The shape guards of the symbolic program are those of its trace alone."""
    texts = []
    for disable in ((), ("cleanup", "dead_gradient")):
        compiled = retrograd.compile(_frozen_model(), executor="interpret", disable=disable)
        for rows in (2, 3):
            compiled(torch.randn(rows, 4, dtype=torch.float64)).sum().backward()
        texts.append(compiled.reports["backward"]["symbolic"]["guards"])
    assert texts[0] == texts[1]


def test_a_size_question_only_a_guard_answers_leaves_the_graph_as_it_was(monkeypatch):
    """A pass that asks ``s0 == 3`` is not run (recorded as skipped), and no guard is
    added; the program is still right."""
    def asks(gm, ctx):
        for node in gm.graph.nodes:
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == 3:
                gm.graph.erase_node(node)   # never reached on a symbolic graph
        return cleanup.run(gm, ctx)
    monkeypatch.setattr(symbolic_passes, "PASSES",
                        {**symbolic_passes.PASSES, "joint": (("cleanup", _Asking(asks)),)})
    compiled = retrograd.compile(lambda x: (x * 2).sin().sum(), executor="interpret")
    for rows in (2, 3, 5):
        x = torch.randn(rows, 4, dtype=torch.float64, requires_grad=True)
        compiled(x).backward()
        assert_close(x.grad, 2 * (2 * x.detach()).cos(), torch.float64, what="gradient")
    record = _record(compiled.reports["backward"], "cleanup")
    assert record["stats"]["skipped"].startswith("a size comparison only a guard decides")
    assert "Eq(" in record["stats"]["skipped"]
    assert "== 3" not in compiled.reports["backward"]["symbolic"]["guards"]


class _Asking:
    """A pass module whose ``run`` is ``function``."""

    def __init__(self, function):
        self.run = function


def _codegen(report: dict) -> dict:
    return _record(report, "codegen")["stats"]


def test_symbolic_programs_say_they_are_not_captured_and_true_warns():
    compiled = retrograd.compile(lambda x: (x * 2).sin().sum(), executor="interpret",
                                 cudagraphs=True)
    with pytest.warns(UserWarning, match="cudagraphs=True.*symbolic program.*symbolic sizes"):
        for rows in (2, 3):
            compiled(torch.randn(rows, 4, requires_grad=True)).backward()
    for half in ("forward", "backward"):
        graphs = _codegen(compiled.reports[half])["cudagraphs"]
        assert graphs["enabled"] is False
        assert graphs["reasons"][0].startswith("symbolic sizes (input 0 dim 0)")
    default = retrograd.compile(lambda x: x.exp().sum(), dynamic=True, executor="interpret")
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the default does not warn
        default(torch.randn(3, requires_grad=True)).backward()
    graphs = _codegen(default.reports["forward"])["cudagraphs"]
    assert graphs["enabled"] is False and "symbolic sizes" in graphs["reasons"][0]
    off = retrograd.compile(lambda x: x.exp().sum(), dynamic=True, cudagraphs=False)
    off(torch.randn(3, requires_grad=True))
    assert _codegen(off.reports["forward"])["cudagraphs"]["reasons"] == [
        "option cudagraphs=False"]


def test_symbolic_step_reports_cleanup_cudagraphs_and_offload():
    model, reference = _model(), _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    eager = torch.optim.SGD(reference.parameters(), lr=0.1)
    step = retrograd.compile_step(model, _loss, optimizer, executor="interpret",
                                  cudagraphs=True)
    with pytest.warns(UserWarning, match="symbolic sizes"):
        for rows in (4, 5, 7):
            batch = (torch.randn(rows, 6, dtype=torch.float64),
                     torch.randn(rows, 3, dtype=torch.float64))
            assert_close(step(*batch), eager_step(reference, eager, _loss, *batch),
                         torch.float64)
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert_close(a, b, torch.float64, what=name)
    report = step.reports["step"]
    assert "symbolic" in report
    assert "skipped" not in _record(report, "cleanup")["stats"]
    assert _codegen(report)["cudagraphs"]["enabled"] is False
    assert _record(report, "offload")["stats"]["skipped"] == symbolic_passes.OFFLOAD


def test_offload_asked_for_on_a_symbolic_program_warns_and_is_reported():
    compiled = retrograd.compile(lambda x: (x * 2).sin().sum(), executor="interpret",
                                 offload=("sin",))
    compiled(torch.randn(2, 4, dtype=torch.float64, requires_grad=True)).backward()
    with pytest.warns(UserWarning, match=r"offload=\['sin'\] is not applied.*static shapes"):
        x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
        compiled(x).backward()
    assert_close(x.grad, 2 * (2 * x.detach()).cos(), torch.float64, what="gradient")
    stats = _record(compiled.reports["backward"], "offload")["stats"]
    assert stats == {"skipped": symbolic_passes.OFFLOAD, "asked": ["sin"]}
