"""Reproducers: a failed compile leaves ``repro.py``, which fails the same way
without the model, and ``retrograd minify`` shrinks it.

The failures are deliberate faults in retrograd (``repro_faults.py``): a
pass that raises on ``aten.sin``, codegen that emits cos for sin (a wrong
number, which ``verify=True`` catches). The fresh process that runs a
written ``repro.py`` has the same fault installed and nothing of the test's
model; without the fault the same file compiles cleanly.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import repro_faults
import retrograd
import torch
import torch._decomp
from retrograd import cli, minify, repro
from retrograd.passes import checkpoint
from retrograd.pipeline import PassError
from retrograd.verify import VerificationError

pytestmark = pytest.mark.usefixtures("fresh_dynamo", "no_dump_env")

TESTS = Path(__file__).parent


@pytest.fixture(autouse=True)
def temporary_folders_here(monkeypatch, tmp_path):
    """Reproducers written without a dump_dir go under the test's tmp_path."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def _twenty(x, w, b):
    """A forward graph of 20-odd nodes with one ``sin`` in the middle."""
    h = torch.tanh(x @ w + b)
    g = torch.sin(h * 3) + h.exp()
    k = (g.relu() * h).sum() + (g ** 2).mean()
    return k + torch.cos(h).sum() * h.sigmoid().mean()


def _inputs():
    return (torch.randn(4, 3), torch.randn(3, 5, requires_grad=True),
            torch.randn(5, requires_grad=True))


def _reproducer(error: BaseException) -> Path:
    found = re.search(r"reproducer: (\S+\.py) ", str(error))
    assert found, f"the error names no reproducer:\n{error}"
    path = Path(found.group(1))
    assert path.is_file()
    return path


def _fresh_process(fault: str | None, path: Path) -> subprocess.CompletedProcess:
    """Run ``path`` as a script in a new interpreter with ``fault`` installed."""
    code = f"import repro_faults; repro_faults.run({fault!r}, {str(path)!r})"
    return subprocess.run([sys.executable, "-c", code], check=False, cwd=TESTS,
                          capture_output=True, text=True, timeout=600)


def _fails(path: Path) -> tuple[bool, BaseException | None, torch.fx.GraphModule]:
    """Load a reproducer file in this process and run it: (same failure?, error, graph)."""
    loaded = minify.load(path)
    graph_module = repro.build(loaded.Repro, loaded.INPUTS, loaded.DESCRIPTORS)
    same, error = repro.fails_as(loaded.STAGE, graph_module, loaded.INPUTS, loaded.EXPECTED)
    return same, error, repro.build(loaded.Repro, loaded.INPUTS, loaded.DESCRIPTORS)


def test_a_failing_pass_leaves_a_repro_that_fails_the_same_way_in_a_fresh_process(monkeypatch):
    repro_faults.install("fusion_sin", monkeypatch)
    compiled = retrograd.compile(_twenty, executor="fx")
    with pytest.raises(PassError, match="pass 'fusion' failed") as caught:
        compiled(*_inputs()).backward()
    path = _reproducer(caught.value)
    assert path.parent.name.startswith("retrograd-repro-")    # no dump_dir: a temporary folder
    text = path.read_text()
    assert "_twenty" not in text and "torch.ops.aten.sin.default" in text
    run = _fresh_process("fusion_sin", path)
    assert run.returncode == 1, run.stderr
    assert "reproduced: ('PassError', 'fusion', 'NotImplementedError')" in run.stderr
    assert "deliberate fault: fusion refuses aten.sin" in run.stderr
    clean = _fresh_process(None, path)            # the same file, retrograd without the fault
    assert clean.returncode == 0, clean.stderr
    assert "did not reproduce" in clean.stderr


def test_a_verify_mismatch_in_codegen_leaves_a_repro_in_the_dump_folder(monkeypatch, tmp_path):
    repro_faults.install("codegen_sin_is_cos", monkeypatch)
    x = torch.randn(3, 4, requires_grad=True)
    compiled = retrograd.compile(lambda x: torch.sin(x * 2).sum(), executor="interpret",
                                 verify=True, dump_dir=str(tmp_path / "dumps"))
    with pytest.raises(VerificationError, match="pass 'codegen' changed") as caught:
        compiled(x).backward()
    assert caught.value.stage == "codegen"
    path = _reproducer(caught.value)
    assert path.parent.parent == tmp_path / "dumps" and path.parent.name.endswith("-forward")
    run = _fresh_process("codegen_sin_is_cos", path)
    assert run.returncode == 1, run.stderr
    assert "reproduced: ('VerificationError', 'codegen')" in run.stderr


def test_minify_shrinks_a_twenty_node_graph_to_a_handful(monkeypatch, capsys):
    repro_faults.install("fusion_sin", monkeypatch)
    with pytest.raises(PassError) as caught:
        retrograd.compile(_twenty, executor="fx")(*_inputs()).backward()
    path = _reproducer(caught.value)
    same, _, original = _fails(path)
    assert same and len(original.graph.nodes) >= 20
    assert cli.main(["minify", str(path)]) == 0
    assert "nodes in" in capsys.readouterr().out
    minified = path.with_name("repro_minified.py")
    same, error, graph_module = _fails(minified)
    assert same, error
    targets = [n.target for n in graph_module.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.sin.default in targets
    assert len(graph_module.graph.nodes) <= 4, graph_module.code


def test_a_joint_stage_repro_keeps_the_inputs_the_graph_mutates(monkeypatch):
    """torch.compile's face, a BatchNorm in training: the joint graph as given
    to partition, with AOTAutograd's descriptors of the running statistics."""
    repro_faults.install("cleanup_sin", monkeypatch)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    compiled = torch.compile(lambda x: torch.sin(model(x)).sum(), backend="retrograd",
                             options={"executor": "fx"})
    with pytest.raises(Exception, match="pass 'cleanup' failed") as caught:
        compiled(torch.randn(6, 3)).backward()
    cause = caught.value
    while not isinstance(cause, PassError):    # dynamo wraps the backend's error
        cause = cause.__cause__ or cause.__context__
    path = _reproducer(cause)
    same, error, graph_module = _fails(path)
    assert same, error
    assert minify.load(path).STAGE.name == "joint"
    assert len(checkpoint.mutated_inputs(graph_module)) == 3    # running mean, var, count


def test_a_training_step_repro_reruns_compile_step(monkeypatch):
    repro_faults.install("cleanup_sin", monkeypatch)
    model = torch.nn.Linear(3, 2)
    step = retrograd.compile_step(model, lambda m, x: torch.sin(m(x)).sum(),
                                  torch.optim.SGD(model.parameters(), lr=0.1), executor="fx")
    with pytest.raises(PassError) as caught:
        step(torch.randn(4, 3))
    path = _reproducer(caught.value)
    loaded = minify.load(path)
    assert loaded.STAGE.name == "step" and loaded.STAGE.updates
    same, error, _ = _fails(path)
    assert same, error


def test_a_wrong_decomposition_says_why_it_has_no_reproducer(monkeypatch):
    """verify's joint stage compares with eager autograd on the model itself."""
    import retrograd.capture
    import retrograd.decompositions
    table = dict(retrograd.decompositions.decomposition_table())
    table[torch.ops.aten.tanh.default] = lambda x: torch.sigmoid(2 * x)
    monkeypatch.setattr(retrograd.capture, "decompositions_for", lambda *args: table)
    compiled = retrograd.compile(lambda x: torch.tanh(x).sum(), executor="fx", verify=True)
    with pytest.raises(VerificationError, match="no reproducer: this stage compares"):
        compiled(torch.randn(3, requires_grad=True)).backward()


def test_minify_refuses_a_file_that_does_not_fail(monkeypatch, capsys):
    repro_faults.install("fusion_sin", monkeypatch)
    with pytest.raises(PassError) as caught:
        retrograd.compile(_twenty, executor="fx")(*_inputs()).backward()
    path = _reproducer(caught.value)
    monkeypatch.undo()                                   # retrograd without the fault
    assert cli.main(["minify", str(path)]) == 1
    assert "does not fail as it records" in capsys.readouterr().err
    assert cli.main(["minify", str(path.with_name("missing.py"))]) == 1


def test_constants_and_ops_without_tensor_inputs_survive_the_round_trip(monkeypatch):
    """A small closed-over tensor is written out, a large one is a random
    stand-in of its shape, and ``arange`` (no tensor input, which a trace of
    ``Repro.forward`` would have run instead of recording) stays a node."""
    repro_faults.install("fusion_sin", monkeypatch)
    mask, table = torch.tensor([1.0, 0.0, 2.0]), torch.randn(100, 3)

    def f(x):
        return (torch.sin(x * mask) + table[:4] + torch.arange(3.0)).sum()

    with torch.no_grad(), pytest.raises(PassError) as caught:
        retrograd.compile(f, executor="fx")(torch.randn(4, 3))
    path = _reproducer(caught.value)
    text = path.read_text()
    assert "torch.tensor([1.0, 0.0, 2.0]" in text and "random, shaped like the constant" in text
    same, error, graph_module = _fails(path)
    assert same, error
    assert minify.load(path).STAGE.name == "inference"
    targets = {n.target for n in graph_module.graph.nodes}
    assert torch.ops.aten.arange.start_step in targets or torch.ops.aten.arange.default in targets


def test_a_crash_in_codegen_leaves_a_repro_named_in_a_note(monkeypatch):
    """An error that is not retrograd's keeps its type and message; the
    reproducer is named in a note (shown under the traceback)."""
    repro_faults.install("codegen_sin_raises", monkeypatch)
    compiled = retrograd.compile(lambda x: torch.sin(x * 2).sum(), executor="interpret")
    with pytest.raises(KeyError, match="deliberate fault") as caught:
        compiled(torch.randn(3, 4, requires_grad=True))
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    path = Path(re.search(r"reproducer: (\S+\.py) ", notes).group(1))
    same, error, _ = _fails(path)
    assert same, error
    assert minify.load(path).EXPECTED[0] == "KeyError"


def test_a_gradient_spec_follows_the_minified_graph(monkeypatch):
    """retrograd.grad's joint graph: the spec (wanted primals, live tangents)
    is recorded and renumbered by the minifier as inputs go."""
    repro_faults.install("cleanup_sin", monkeypatch)
    gradient = retrograd.grad(lambda x, w: torch.sin(x @ w).sum(), argnums=1, executor="fx")
    with pytest.raises(PassError) as caught:
        gradient(torch.randn(4, 3), torch.randn(3, 2))
    path = _reproducer(caught.value)
    assert minify.load(path).STAGE.gradients["wanted"] == (1,)
    assert cli.main(["minify", str(path)]) == 0
    same, error, graph_module = _fails(path.with_name("repro_minified.py"))
    assert same, error
    assert len(graph_module.graph.nodes) <= 4, graph_module.code
