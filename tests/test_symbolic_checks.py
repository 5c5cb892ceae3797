"""dump_dir and verify on symbolic programs (compiler/symbolic_checks.py): the
dump holds the symbolic graphs, kernels, run-time plan and report; verify
checks the first call at each size against the joint graph and eager, on
the call's real inputs."""

from __future__ import annotations

import copy
import json

import pytest
import retrograd
import torch
from checks import assert_close
from retrograd.symbolic_runner import ArenaRunner
from retrograd.verify import VerificationError
from test_dynamic_shapes import Attention
from test_symbolic_passes import _symbolic_compiler

pytestmark = pytest.mark.usefixtures("cache")


def function(x):
    return (x * 2).sin().sum()


def _call(compiled, fn, rows: int) -> None:
    x = torch.randn(rows, 4, dtype=torch.float64, requires_grad=True)
    reference = x.detach().clone().requires_grad_()
    got = compiled(x)
    got.backward()
    expected = fn(reference)
    expected.backward()
    assert_close(got, expected, torch.float64)
    assert_close(x.grad, reference.grad, torch.float64, what="gradient")


def test_the_dump_holds_the_symbolic_graphs_kernels_plan_and_report(tmp_path):
    root = tmp_path / "dumps"
    compiled = retrograd.compile(function, dump_dir=str(root), executor="interpret")
    for rows in (2, 3, 5):
        _call(compiled, function, rows)
    folders = sorted(path.name for path in root.iterdir() if path.name.startswith("s"))
    assert len(folders) == 2 and folders[0].endswith("-backward") \
        and folders[1].endswith("-forward"), folders
    forward = root / folders[1]
    names = sorted(path.name for path in forward.iterdir())
    assert [n for n in names if n.endswith(".py")] == ["00_joint.py", "01_checkpoint.py",
                                                       "02_symbolic_fusion.py"], names
    assert "sym_size" in (root / folders[0] / "01_checkpoint.py").read_text() or \
        "s0" in (forward / "00_joint.py").read_text()
    assert list((forward / "kernels").glob("sized_pointwise_*.py"))
    report = json.loads((forward / "report.json").read_text())
    assert report["graph_id"] == folders[1]
    assert report["symbolic"]["dims"] == "input 0 dim 0"
    assert "L['t0'].size()[0]" in report["symbolic"]["guards"]   # rewritten after the trace
    assert report["symbolic"]["checkpoint"]["solver"].startswith("min-cut")
    assert "value" in (forward / "memory_plan.txt").read_text()


def test_verify_checks_the_first_call_at_each_size_against_eager():
    torch.manual_seed(0)
    model = Attention().double()
    reference = copy.deepcopy(model)
    compiled = retrograd.compile(model, verify=True)
    for length in (3, 5, 7, 5):
        x = torch.randn(2, length, 8, dtype=torch.float64)
        model.zero_grad()
        reference.zero_grad()
        compiled(x).backward()
        reference(x).backward()
        for (name, a), b in zip(model.named_parameters(), reference.parameters()):
            assert_close(a.grad, b.grad, torch.float64, what=name)
    verifier = _symbolic_compiler(compiled).verifier
    assert verifier.checked == 2   # lengths 5 and 7; 3 is the static program's
    assert verifier.eager_checked == 2   # the joint graph against eager autograd too
    assert not verifier.pending


def test_verify_catches_a_wrong_symbolic_program(monkeypatch):
    """The arena runner corrupted: verify raises naming the symbolic program;
    the same corruption without verify goes unnoticed by the program."""
    original = ArenaRunner.__call__

    def wrong(self, args):
        outputs = original(self, args)
        return [o * 1.5 if isinstance(o, torch.Tensor) and o.is_floating_point() else o
                for o in outputs]
    monkeypatch.setattr(ArenaRunner, "__call__", wrong)
    compiled = retrograd.compile(function, verify=True)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    compiled(x).backward()   # the static program
    with pytest.raises(VerificationError, match="symbolic program"):
        compiled(torch.randn(3, 4, dtype=torch.float64, requires_grad=True)).backward()
    unchecked = retrograd.compile(function)
    unchecked(x).backward()
    y = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    unchecked(y).backward()   # wrong, silently: what verify is for
    assert not torch.allclose(y.grad, 2 * (2 * y.detach()).cos())


def test_torch_compile_face_verifies_dumps_and_plans_its_symbolic_graph(fresh_dynamo,
                                                                        symbolic_graphs,
                                                                        tmp_path):
    made = symbolic_graphs
    torch.manual_seed(0)
    model = Attention().double()
    reference = copy.deepcopy(model)
    root = tmp_path / "dumps"
    compiled = torch.compile(model, backend="retrograd",
                             options={"verify": True, "dump_dir": str(root)})
    for length in (3, 5, 7):
        x = torch.randn(2, length, 8, dtype=torch.float64)
        model.zero_grad()
        reference.zero_grad()
        compiled(x).backward()
        reference(x).backward()
        for (name, a), b in zip(model.named_parameters(), reference.parameters()):
            assert_close(a.grad, b.grad, torch.float64, what=name)
    assert len(made) == 1
    compiler = made[0].compiler
    assert compiler.checkpoint is not None and compiler.runners["forward"] is not None
    assert compiler.verifier.checked == 2   # lengths 5 and 7
    assert compiler.runners["forward"].last_plan is not None
    folders = [p.name for p in root.iterdir() if p.name.startswith("s")]
    assert len(folders) == 2, folders
