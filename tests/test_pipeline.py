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

HALF = ["fusion", "matmul_templates", "layout", "schedule", "buffer_reuse"]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def _ran(report: dict) -> list[str]:
    return [record["name"] for record in report["passes"] if record["name"] != "codegen"]


def test_every_pass_is_declared_once_per_stage_with_its_contract():
    assert pass_names() == ("dead_gradient", "tied_gradients", "linear_cross_entropy",
                            "restore_decompositions", "cleanup", "checkpoint", "offload",
                            "fusion", "matmul_templates", "layout", "schedule", "buffer_reuse")
    assert required_passes() == ("restore_decompositions", "checkpoint", "fusion")
    for stage in Stage:
        names = [spec.name for spec in passes_for(stage)]
        assert len(names) == len(set(names)), (stage, names)
    for spec in PIPELINE:
        assert "Requires:" in spec.contract and "Ensures:" in spec.contract, spec.name


def test_disable_drops_a_pass_from_its_stages_but_never_a_required_one():
    names = [spec.name for spec in passes_for(Stage.HALF, ("layout", "schedule", "fusion"))]
    assert names == ["fusion", "matmul_templates", "buffer_reuse"]
    assert [s.name for s in passes_for(Stage.JOINT, ("cleanup", "linear_cross_entropy"))] \
        == ["dead_gradient", "tied_gradients", "restore_decompositions", "checkpoint",
            "offload"]


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
    assert _ran(compiled.reports["forward"]) == ["linear_cross_entropy",
                                                 "restore_decompositions", "cleanup"] + HALF


def test_a_training_step_runs_the_step_stage():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = retrograd.compile_step(model, lambda m, x: m(x).square().mean(), optimizer,
                                  executor="fx")
    step(torch.randn(3, 4))
    assert _ran(step.reports["step"]) == ["linear_cross_entropy", "restore_decompositions",
                                          "cleanup", "checkpoint", "offload"] + HALF


def test_a_pass_must_return_a_pass_result():
    ctx = PassContext(Options(), Dumper(None, []), OpSupport(), "unit")
    graph = torch.fx.symbolic_trace(lambda x: x + 1)
    assert run_pass("fine", lambda gm, ctx: PassResult(gm, {"n": 1}), graph, ctx, []) is graph
    with pytest.raises(PassError, match=r"pass 'legacy'.*PassResult"):
        run_pass("legacy", lambda gm, ctx: {"n": 1}, graph, ctx, [])


# -- import directions (shared/DESIGN.md) ------------------------------------------------------

def _imports(path) -> set[str]:
    import ast
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {name for name in found if name.startswith("retrograd")}


def test_import_directions_hold():
    """passes, codegen and runtime never import each other or the compiler
    package's modules (only retrograd.ir); no pass imports another pass (op
    classes and planners are shared); ir imports nothing of ours."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    passes = {p.stem for p in (root / "passes").glob("*.py")} - {"__init__", "op_classes"}
    packages = {"passes": "retrograd.passes", "codegen": "retrograd.codegen",
                "runtime": "retrograd.runtime"}
    for folder, own in packages.items():
        for path in (root / folder).rglob("*.py"):
            for name in _imports(path):
                if name.startswith(own) or name == "retrograd" or name.startswith("retrograd.ir"):
                    continue
                assert False, f"{path.relative_to(root)} imports {name}"
    for path in (root / "passes").rglob("*.py"):
        for name in _imports(path):
            stem = name.removeprefix("retrograd.passes.").split(".")[0]
            if name.startswith("retrograd.passes.") and stem in passes:
                assert path.stem == stem, f"{path.relative_to(root)} imports the pass {name}"
    assert _imports(root / "compiler" / "ir.py") == set()
