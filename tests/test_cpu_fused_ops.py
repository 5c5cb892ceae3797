"""The torch program calls fused ATen ops where eager does (issue 15, item 6).

Under ``executor="torch"`` (what ``"auto"`` runs on a CPU) the graph is traced
with ``decompositions.TORCH_WHOLE`` kept whole: GELU, its derivative and layer
norm's backward run as one torch call each instead of 8-15. Checked here: the
calls are in the generated programs, gradients match eager, the measured saved
bytes are not above those of the fully decomposed trace, and the interpreter
and Triton keep every decomposition.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import retrograd
import torch
from retrograd import capture
from retrograd.decompositions import TORCH_WHOLE, decomposition_table, table_for
from zoo import ZOO, assert_parity, clone_inputs, training_step

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from measuring import saved_storage_bytes

aten = torch.ops.aten


def _programs(directory: Path) -> dict[str, str]:
    """``{"forward": text, "backward": text}`` of the dumped programs' bodies."""
    found = {}
    for path in directory.glob("*/program.py"):
        half = "backward" if path.parent.name.endswith("backward") else "forward"
        found[half] = path.read_text().split("def run(")[1].split("\nINPUTS")[0]
    return found


@pytest.mark.cpu_default
@pytest.mark.filterwarnings("error::RuntimeWarning")   # the planner's inf * 0, once
def test_the_torch_program_calls_the_fused_ops(tmp_path):
    entry = ZOO["mlp"]
    model = entry.model()
    reference = copy.deepcopy(model)
    inputs = entry.inputs()
    compiled = retrograd.compile(model, dump_dir=str(tmp_path))
    assert_parity(training_step(entry, compiled, model, inputs),
                  training_step(entry, reference, reference, inputs), tolerance=1e-5)
    programs = _programs(tmp_path)
    assert "gelu_default(" in programs["forward"]
    # the entry point, or its out overload writing over the dying gradient (torch_out.py)
    assert any(call in programs["backward"] for call in ("gelu_backward_default(",
                                                          "aten.gelu_backward.grad_input("))
    assert "native_layer_norm_backward_default(" in programs["backward"]
    assert "erf" not in programs["forward"] + programs["backward"]


def _saved_and_parity(name: str, monkeypatch, decomposed: bool) -> int:
    """Measured saved bytes of ``name``'s step under the torch program (traced
    with the full decomposition table when ``decomposed``), after checking
    its gradients against eager."""
    if decomposed:
        monkeypatch.setattr(capture, "decompositions_for", lambda executor, tensors:
                            decomposition_table())
    entry = ZOO[name]
    torch.manual_seed(0)
    model = entry.model()
    reference = copy.deepcopy(model)
    inputs = entry.inputs()
    compiled = retrograd.compile(model, executor="torch")
    assert_parity(training_step(entry, compiled, model, inputs),
                  training_step(entry, reference, reference, inputs), tolerance=1e-5)
    copies = clone_inputs(inputs)
    excluded = [*model.parameters(), *model.buffers(), *copies]
    saved = saved_storage_bytes(lambda: entry.run(compiled, copies), excluded)
    monkeypatch.undo()
    return saved


@pytest.mark.parametrize("name", ["mlp_frozen", "attention_block",
                                  pytest.param("lora", marks=pytest.mark.slow)])
def test_saved_bytes_not_above_the_decomposed_trace(name, monkeypatch):
    fused = _saved_and_parity(name, monkeypatch, decomposed=False)
    decomposed = _saved_and_parity(name, monkeypatch, decomposed=True)
    assert 0 < fused <= decomposed, (fused, decomposed)


@pytest.mark.cpu_default
def test_compile_step_keeps_them_whole_too(tmp_path):
    """compile_step traces forward, backward and update at once: the same table."""
    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(),
                                   torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))

    def loss_of(model, x, y):
        return torch.nn.functional.cross_entropy(model(x), y)
    mine, eager = build(), build()
    step = retrograd.compile_step(mine, loss_of, torch.optim.SGD(mine.parameters(), lr=0.1),
                                  dump_dir=str(tmp_path))
    reference = torch.optim.SGD(eager.parameters(), lr=0.1)
    x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
    for _ in range(2):
        loss = step(x, y)
        reference.zero_grad()
        expected = loss_of(eager, x, y)
        expected.backward()
        reference.step()
        torch.testing.assert_close(loss.detach(), expected.detach())
    for p, q in zip(mine.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    text = "".join(path.read_text() for path in tmp_path.glob("*/program.py"))
    assert "gelu_backward_default(" in text or "aten.gelu_backward.grad_input(" in text
    assert "native_layer_norm_backward_default(" in text


def test_the_interpreter_and_triton_keep_every_decomposition():
    """Only the torch program's table leaves TORCH_WHOLE out ("auto" is pinned
    to the interpreter outside ``cpu_default`` tests, tests/conftest.py)."""
    cpu = [torch.ones(2)]
    for requested in ("auto", "interpret", "triton"):   # triton on CPU: refused later
        table = table_for(requested, cpu)
        assert all(op in table for op in TORCH_WHOLE), requested
    torch_table = table_for("torch", cpu)
    assert not any(op in torch_table for op in TORCH_WHOLE)
    assert aten.native_layer_norm.default in torch_table   # recomputed in the backward


@pytest.mark.cpu_default
def test_auto_on_cpu_is_the_torch_table():
    assert table_for("auto", [torch.ones(2)]) is decomposition_table(executor="torch")


@pytest.mark.cpu_default
def test_a_dumped_program_calling_retrograd_ops_runs_alone(tmp_path):
    """A linear + cross-entropy becomes ``torch.ops.retrograd.linear_cross_entropy``
    (passes/linear_cross_entropy.py); the dump's program.py must register it
    itself to run as ``python program.py`` (it raised AttributeError)."""
    import subprocess

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 6)

        def forward(self, x, y):
            return torch.nn.functional.cross_entropy(self.proj(x), y)
    model = retrograd.compile(Head(), dump_dir=str(tmp_path))
    model(torch.randn(5, 8), torch.randint(0, 6, (5,))).backward()
    paths = sorted(tmp_path.glob("*/program.py"))
    assert any("torch.ops.retrograd." in path.read_text() for path in paths)
    for path in paths:
        done = subprocess.run([sys.executable, str(path), "--repeat", "1"],
                              capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
