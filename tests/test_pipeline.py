"""The declared pipeline: PIPELINE says which passes run, where and in what
order, and the reports of every face follow it; every pass keeps one contract."""

from __future__ import annotations

import pytest
import torch

import retrograd
from retrograd.dump import Dumper
from retrograd.ir import PassResult
from retrograd.options import Options
from retrograd.pipeline import (PIPELINE, OpSupport, PassContext, PassError, Stage, pass_names,
                                passes_for, required_passes, run_pass)

HALF = ["fusion", "layout", "schedule", "buffer_reuse"]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def _ran(report: dict) -> list[str]:
    return [record["name"] for record in report["passes"] if record["name"] != "codegen"]


def test_every_pass_is_declared_once_per_stage_with_its_contract():
    assert pass_names() == ("dead_gradient", "cleanup", "checkpoint", "fusion", "layout",
                            "schedule", "buffer_reuse")
    assert required_passes() == ("checkpoint", "fusion")
    for stage in Stage:
        names = [spec.name for spec in passes_for(stage)]
        assert len(names) == len(set(names)), (stage, names)
    for spec in PIPELINE:
        assert "Requires:" in spec.contract and "Ensures:" in spec.contract, spec.name


def test_disable_drops_a_pass_from_its_stages_but_never_a_required_one():
    names = [spec.name for spec in passes_for(Stage.HALF, ("layout", "schedule", "fusion"))]
    assert names == ["fusion", "buffer_reuse"]
    assert [s.name for s in passes_for(Stage.JOINT, ("cleanup",))] == ["dead_gradient",
                                                                       "checkpoint"]


@pytest.mark.parametrize("disable", [(), ("cleanup", "layout"), ("dead_gradient", "schedule",
                                                                  "buffer_reuse")])
def test_training_reports_follow_the_pipeline(disable):
    model = _model()
    compiled = retrograd.compile(model, executor="fx", disable=disable)
    compiled(torch.randn(3, 4)).sum().backward()
    joint = [s.name for s in passes_for(Stage.JOINT, disable)]
    half = [s.name for s in passes_for(Stage.HALF, disable)]
    for which in ("forward", "backward"):
        assert _ran(compiled.reports[which]) == joint + half


def test_inference_runs_the_inference_stage():
    compiled = retrograd.compile(_model(), executor="fx")
    with torch.no_grad():
        compiled(torch.randn(3, 4))
    assert _ran(compiled.reports["forward"]) == ["cleanup"] + HALF


def test_a_training_step_runs_the_step_stage():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = retrograd.compile_step(model, lambda m, x: m(x).square().mean(), optimizer,
                                  executor="fx")
    step(torch.randn(3, 4))
    assert _ran(step.reports["step"]) == ["cleanup", "checkpoint"] + HALF


def test_a_pass_must_return_a_pass_result():
    ctx = PassContext(Options(), Dumper(None, []), OpSupport(), "unit")
    graph = torch.fx.symbolic_trace(lambda x: x + 1)
    assert run_pass("fine", lambda gm, ctx: PassResult(gm, {"n": 1}), graph, ctx, []) is graph
    with pytest.raises(PassError, match=r"pass 'legacy'.*PassResult"):
        run_pass("legacy", lambda gm, ctx: {"n": 1}, graph, ctx, [])
