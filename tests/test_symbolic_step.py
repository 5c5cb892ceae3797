"""compile_step with dynamic sizes (compiler/step_dynamic.py): after a batch
dimension's second size one symbolic step program serves the later sizes;
parameters and optimizer state match an eager loop at sizes never traced."""

from __future__ import annotations

import copy
import json
import logging
import operator
import sys
from pathlib import Path

import pytest
import retrograd
import torch
from checks import assert_close, eager_step

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from measuring import profiled_peak
from symbolic_models import batch as _batch
from symbolic_models import mlp as _model
from symbolic_models import mse as _loss

pytestmark = pytest.mark.usefixtures("cache")


@pytest.mark.parametrize("executor", ["torch", "interpret"])
def test_ten_batch_sizes_compile_two_step_programs_and_match_eager(executor, caplog):
    model, reference = _model(), _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    eager = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    step = retrograd.compile_step(model, _loss, optimizer, executor=executor)
    with caplog.at_level(logging.INFO, logger="retrograd"):
        for rows in (4, 5, 7, 13, 4, 2, 9, 31, 6, 11):
            batch = _batch(rows)
            assert_close(step(*batch), eager_step(reference, eager, _loss, *batch),
                         torch.float64)
            for (name, a), b in zip(model.named_parameters(), reference.parameters()):
                assert_close(a, b, torch.float64, what=name)
                assert_close(optimizer.state[a]["exp_avg_sq"], eager.state[b]["exp_avg_sq"],
                             torch.float64, what=f"{name} exp_avg_sq")
    assert len(step.entries) == 1 and step.dynamic.compiles == 1
    symbolic = step.reports["step"]["symbolic"]
    assert symbolic["dims"] == "batch input 0 dim 0, batch input 1 dim 0"
    assert symbolic["executor"] == executor and "L['t" in symbolic["guards"]
    assert any("tracing with them symbolic" in r.getMessage() for r in caplog.records)
    runner = step.dynamic.last.runner
    assert runner.last_plan.arena_bytes, runner.last_plan   # arenas sized for 11 rows
    if executor == "interpret":
        assert step.reports["step"]["kernels"]["triton"] >= 1


def test_dynamic_false_keeps_a_static_step_program_per_size():
    model, reference = _model(), _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    eager = torch.optim.SGD(reference.parameters(), lr=0.1)
    step = retrograd.compile_step(model, _loss, optimizer, dynamic=False, executor="torch")
    for rows in (3, 4, 5):
        batch = _batch(rows)
        step(*batch)
        eager_step(reference, eager, _loss, *batch)
    for a, b in zip(model.parameters(), reference.parameters()):
        assert_close(a, b, torch.float64)
    assert len(step.entries) == 3 and step.dynamic.compiles == 0


def test_a_batch_the_guards_refuse_is_traced_again():
    """A size of 1 is never a symbol: the first symbolic program's guards
    refuse a batch of one row, which is traced again (that size fixed in the
    new program's guards); a second one-row batch reuses it."""
    model = _model()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    eager = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    step = retrograd.compile_step(model, _loss, optimizer, executor="torch")
    for rows in (3, 5, 1, 8, 1):
        batch = _batch(rows)
        assert_close(step(*batch), eager_step(reference, eager, _loss, *batch), torch.float64)
    for a, b in zip(model.parameters(), reference.parameters()):
        assert_close(a, b, torch.float64)
    assert step.dynamic.compiles == 2 and len(step.entries) == 1   # size 3 static
    (first, one_row), = step.dynamic.programs.values()
    assert step.dynamic.last is one_row
    step(*_batch(6))
    assert step.dynamic.last is first and step.dynamic.compiles == 2


def _optimizer(kind: str, model: torch.nn.Module):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _check_state(model, optimizer, reference, eager) -> None:
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert_close(a, b, torch.float64, what=name)
        for key, value in eager.state[b].items():
            if key != "step":
                assert_close(optimizer.state[a][key], value, torch.float64, what=f"{name} {key}")


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("executor", ["torch", "interpret"])
def test_updates_are_written_over_parameters_and_state(kind, executor):
    """The symbolic step writes every new parameter and optimizer state over
    the input it replaces (symbolic_donation.py): the storages the optimizer
    holds stay the same ones, and at sizes never traced (odd ones too) the
    values match an eager loop."""
    model, reference = _model(), _model()
    optimizer, eager = _optimizer(kind, model), _optimizer(kind, reference)
    step = retrograd.compile_step(model, _loss, optimizer, executor=executor)
    for rows in (4, 6):
        batch = _batch(rows)
        step(*batch)
        eager_step(reference, eager, _loss, *batch)
    pointers = [p.data_ptr() for p in model.parameters()]
    state = [v.data_ptr() for p in model.parameters() for k, v in optimizer.state[p].items()
             if k != "step"]
    for rows in (5, 9, 2, 13):
        batch = _batch(rows)
        assert_close(step(*batch), eager_step(reference, eager, _loss, *batch), torch.float64)
    _check_state(model, optimizer, reference, eager)
    assert step.dynamic.compiles == 1
    memory = step.reports["step"]["memory"]
    assert memory["updates_in_place"] == len(pointers) + len(state) > 0, memory
    assert memory["updates_out_of_place"] == 0
    assert [p.data_ptr() for p in model.parameters()] == pointers
    assert [v.data_ptr() for p in model.parameters() for k, v in optimizer.state[p].items()
            if k != "step"] == state


def _deep_model() -> torch.nn.Module:
    """Six layers: the new values of every parameter, held together until
    the end of an out-of-place step, outweigh one layer's gradient work."""
    torch.manual_seed(0)
    layers = [m for _ in range(6) for m in (torch.nn.Linear(32, 32), torch.nn.Tanh())]
    return torch.nn.Sequential(*layers, torch.nn.Linear(32, 3)).double()


def _step_peaks(monkeypatch, kind: str, in_place: bool) -> list[int]:
    from retrograd import step_dynamic
    from retrograd.symbolic_donation import Donation
    if not in_place:   # the symbolic step before in-place updates: every value copied back
        monkeypatch.setattr(step_dynamic, "donations",
                            lambda gm, updates: Donation({}, {}, {}, frozenset()))
    model, reference = _deep_model(), _deep_model()
    optimizer, eager = _optimizer(kind, model), _optimizer(kind, reference)
    step = retrograd.compile_step(model, _loss, optimizer, executor="torch")
    batch = lambda rows: (torch.randn(rows, 32, dtype=torch.float64),
                          torch.randn(rows, 3, dtype=torch.float64))
    peaks = []
    for rows in (4, 6, 7, 11):
        inputs = batch(rows)
        if rows in (7, 11):   # sizes never traced
            peaks.append(profiled_peak(lambda inputs=inputs: step(*inputs)))
        else:
            step(*inputs)
        eager_step(reference, eager, _loss, *inputs)
    _check_state(model, optimizer, reference, eager)
    monkeypatch.undo()
    return peaks


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_in_place_updates_lower_the_measured_step_peak(monkeypatch, kind):
    """The profiler's peak of the symbolic step at two untraced sizes, with
    updates in place, against the same step with every update a new tensor
    copied back (the symbolic step before symbolic_donation.py)."""
    in_place = _step_peaks(monkeypatch, kind, True)
    copied = _step_peaks(monkeypatch, kind, False)
    for mine, before in zip(in_place, copied):
        assert mine < before, (in_place, copied)


def test_an_input_sharing_its_storage_is_not_written_over():
    """Checked per call: a donated input whose storage another input shares
    (or whose strides differ from the trace's) is computed out of place."""
    from retrograd.symbolic_donation import Donation
    donation = Donation({"new": 0}, {}, {0: ((2, 3), (3, 1), torch.float32)},
                        frozenset({"new"}))
    alone, other = torch.zeros(2, 3), torch.zeros(6)
    assert set(donation.targets([alone, other])) == {0}
    assert donation.targets([alone, alone.view(6)]) == {}
    assert donation.targets([torch.zeros(3, 2).t(), other]) == {}


class _Blocks(torch.nn.Module):
    """Pointwise chains between layers: the min-cut saves each layer's input
    and recomputes the chain in the backward."""

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(8, 32)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(32, 32) for _ in range(4))
        self.last = torch.nn.Linear(32, 3)

    def forward(self, x):
        h = self.first(x)
        for layer in self.layers:
            h = h * torch.sigmoid(h)
            h = layer(torch.sin(h) * h)
        return self.last(h)


def _blocks() -> torch.nn.Module:
    torch.manual_seed(0)
    return _Blocks().double()


def _remat_run(monkeypatch, kind: str, executor: str, placed: bool, sizes=(5, 11)):
    """(peaks at ``sizes``, step, model, optimizer, reference, eager) after two
    traced sizes; ``placed=False``: the symbolic step without checkpoint placement."""
    from retrograd import step_dynamic
    if not placed:
        monkeypatch.setattr(step_dynamic, "place_checkpoints",
                            lambda gm, seed, options, what: {"skipped": "test"})
    model, reference = _blocks(), _blocks()
    optimizer, eager = _optimizer(kind, model), _optimizer(kind, reference)
    step = retrograd.compile_step(model, _loss, optimizer, executor=executor)
    batch = lambda rows: (torch.randn(rows, 8, dtype=torch.float64),
                          torch.randn(rows, 3, dtype=torch.float64))
    peaks = []
    for rows in (4, 6) + tuple(sizes):
        inputs = batch(rows)
        losses = []
        if rows in sizes:   # never traced
            peaks.append(profiled_peak(lambda inputs=inputs, losses=losses: losses.append(step(*inputs))))
        else:
            losses.append(step(*inputs))
        assert_close(losses[0], eager_step(reference, eager, _loss, *inputs), torch.float64)
    _check_state(model, optimizer, reference, eager)
    monkeypatch.undo()
    return peaks, step


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("executor", ["torch", "interpret"])
def test_checkpoints_are_placed_in_the_symbolic_step(monkeypatch, kind, executor):
    """The checkpoint plan made at the size hints is applied to the symbolic
    step graph (symbolic_remat.py): each block's pointwise chain recomputed
    in the backward from the saved layer outputs, the numbers eager's at
    untraced odd sizes."""
    _, step = _remat_run(monkeypatch, kind, executor, True, sizes=(5, 9))
    plan = step.reports["step"]["symbolic"]["checkpoint"]
    assert {"sigmoid", "sin", "sigmoid_3", "sin_3"} <= set(plan["recomputed"]), plan
    assert plan["copies"] == len(plan["recomputed"]) and plan["sizes"].endswith("hints")
    assert not {"sigmoid", "sin"} & set(plan["saved"])
    assert step.reports["step"]["ledger"], "the ledger of the plan at the hints"
    if executor == "torch":
        names = {node.name for node in step.dynamic.last.runner.gm.graph.nodes}
        assert {"sigmoid_recomputed", "sin_3_recomputed"} <= names


def test_checkpoints_lower_the_measured_step_peak(monkeypatch):
    """Profiler peak of the symbolic step at two untraced sizes with and
    without the checkpoint placement (the symbolic step before it):
    measured 0.47x on this model at 61 and 101 rows."""
    placed, _ = _remat_run(monkeypatch, "adamw", "torch", True, sizes=(61, 101))
    traced, _ = _remat_run(monkeypatch, "adamw", "torch", False, sizes=(61, 101))
    for mine, before in zip(placed, traced):
        assert mine < before, (placed, traced)


def test_checkpoints_with_buffers_written_at_the_end_of_the_step():
    """BatchNorm's running statistics are written back at the end of the
    traced step, after every recomputed copy (which read the old values):
    checkpoints are placed, parameters, state and statistics are eager's."""
    torch.manual_seed(0)
    # BatchNorm first: a bias just before it would have a gradient of rounding noise
    make = lambda: torch.nn.Sequential(torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 8),
                                       torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    model = make()
    reference = copy.deepcopy(model)
    optimizer, eager = _optimizer("sgd", model), _optimizer("sgd", reference)
    step = retrograd.compile_step(model, _loss, optimizer, executor="torch")
    for rows in (4, 6, 5, 9):
        batch = _batch(rows)
        assert_close(step(*batch), eager_step(reference, eager, _loss, *batch), torch.float64)
    _check_state(model, optimizer, reference, eager)
    for (name, a), b in zip(model.named_buffers(), reference.buffers()):
        assert_close(a, b, a.dtype, what=name)   # running statistics, batches seen
    assert step.dynamic.compiles == 1
    plan = step.reports["step"]["symbolic"]["checkpoint"]
    assert "skipped" not in plan and "var_mean" in plan["recomputed"], plan


def test_a_recomputed_value_that_reads_a_written_input_is_found():
    """symbolic_remat skips the placement (the traced graph kept) when the
    plan recomputes a value reading an input the step writes (``copy_``):
    the copy could read the new value. The predicate it asks, on a graph
    that writes its input."""
    from retrograd import symbolic_remat

    def traced(x, buffer, seed):
        y = torch.sin(x + buffer)
        buffer.copy_(x.detach().sum(0))
        return (y * y * seed).sum()
    gm = torch.fx.symbolic_trace(traced)
    for node in gm.graph.nodes:   # as functionalization writes it: aten.copy_
        if node.op == "call_method" and node.target == "copy_":
            node.op, node.target = "call_function", torch.ops.aten.copy_.default
    gm.recompile()
    add = next(n.name for n in gm.graph.nodes if n.target is operator.add)
    assert symbolic_remat._recomputes_from_written_input(gm, {add})
    assert not symbolic_remat._recomputes_from_written_input(gm, {"sin"})


def test_the_symbolic_step_is_dumped(tmp_path):
    """dump_dir: the symbolic step's folder ``s<digest>-step`` holds the
    traced step graph, the graph after checkpoint placement and after fusion,
    the size-generic kernels, the run-time memory plan and the report."""
    root = tmp_path / "dumps"
    model = _blocks()
    step = retrograd.compile_step(model, _loss, _optimizer("adamw", model),
                                  executor="interpret", dump_dir=str(root))
    for rows in (4, 6, 5):
        step(torch.randn(rows, 8, dtype=torch.float64), torch.randn(rows, 3, dtype=torch.float64))
    folders = [p for p in root.iterdir() if p.name.startswith("s") and p.name.endswith("-step")]
    assert len(folders) == 1, sorted(p.name for p in root.iterdir())
    folder = folders[0]
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".py"))
    assert names == ["00_joint.py", "01_checkpoint.py", "02_symbolic_fusion.py"], names
    assert "sin_3_recomputed" in (folder / "01_checkpoint.py").read_text()
    assert "sin_3_recomputed" not in (folder / "00_joint.py").read_text()
    assert list((folder / "kernels").glob("sized_pointwise_*.py"))
    assert "value" in (folder / "memory_plan.txt").read_text()
    report = json.loads((folder / "report.json").read_text())
    assert report["graph_id"] == folder.name and report["memory"]["updates_in_place"] > 0
    assert report["symbolic"]["checkpoint"]["recomputed"]


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_verify_checks_the_symbolic_step_at_each_new_size(kind):
    model, reference = _blocks(), _blocks()
    optimizer, eager = _optimizer(kind, model), _optimizer(kind, reference)
    step = retrograd.compile_step(model, _loss, optimizer, executor="torch", verify=True)
    for rows in (4, 6, 5, 6, 9):
        batch = (torch.randn(rows, 8, dtype=torch.float64),
                 torch.randn(rows, 3, dtype=torch.float64))
        assert_close(step(*batch), eager_step(reference, eager, _loss, *batch), torch.float64)
    _check_state(model, optimizer, reference, eager)
    assert step.dynamic.last.executable.verifier.checked == 3   # rows 6, 5, 9


def test_verify_catches_a_wrong_symbolic_step(monkeypatch):
    """A checkpoint copy corrupted (a recomputed sine computed as a cosine):
    verify raises naming the symbolic step program."""
    from retrograd import step_dynamic, symbolic_remat
    from retrograd.verify import VerificationError
    original = symbolic_remat.place_checkpoints

    def wrong(gm, seed, options, what):
        stats = original(gm, seed, options, what)
        for node in gm.graph.nodes:
            if node.name == "sin_recomputed":
                node.target = torch.ops.aten.cos.default
        gm.recompile()
        return stats
    monkeypatch.setattr(step_dynamic, "place_checkpoints", wrong)
    model = _blocks()
    step = retrograd.compile_step(model, _loss, _optimizer("sgd", model), executor="torch",
                                  verify=True)
    step(torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(VerificationError, match="symbolic step program"):
        step(torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64))


def test_verify_leaves_a_static_step_training_as_eager():
    """verify=True on the static step ran its checks (the program, which
    writes parameters and state in place) on the model's own tensors: every
    compile applied the update twice (graph_compiler._compile_whole now
    checks on copies)."""
    model, reference = _model(), _model()
    optimizer, eager = _optimizer("sgd", model), _optimizer("sgd", reference)
    step = retrograd.compile_step(model, _loss, optimizer, executor="torch", verify=True,
                                  dynamic=False)
    for rows in (4, 5, 4):
        batch = _batch(rows)
        assert_close(step(*batch), eager_step(reference, eager, _loss, *batch), torch.float64)
    _check_state(model, optimizer, reference, eager)
