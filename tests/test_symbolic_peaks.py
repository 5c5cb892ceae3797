"""The report's peaks (schema 4) on symbolic programs (compiler/symbolic_peaks.py):
``predicted_peak_bytes`` and ``program_peak_bytes`` at the size hints, equal to
what a static program of those sizes reports; ``measured_peak_bytes`` null
with the reason without verify, and under ``verify=True`` the measured peak
of the first call at the hints (``HintProbe``), compared with
``program_peak_bytes`` on each face; null with a reason where no checkpoint
plan ran."""

from __future__ import annotations

import pytest
import retrograd
import torch
from retrograd import cli
from retrograd.symbolic_peaks import NOT_MEASURED, PENDING
from symbolic_models import batch as _batch
from symbolic_models import mlp as _mlp
from symbolic_models import mse as _loss

PEAKS = {"predicted_peak_bytes", "program_peak_bytes", "measured_peak_bytes",
         "measured_peak_note", "peak_sizes"}


pytestmark = pytest.mark.usefixtures("cache")


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(6, 16, dtype=torch.float64))
        self.w2 = torch.nn.Parameter(torch.randn(16, 4, dtype=torch.float64))

    def forward(self, x):
        h = torch.tanh(x @ self.w1) * 2
        return (torch.sin(h @ self.w2) ** 2).sum()


def _x(rows: int) -> torch.Tensor:
    return torch.randn(rows, 6, dtype=torch.float64)


def _peaks(report: dict) -> dict:
    return {k: v for k, v in report["memory"].items() if k in PEAKS}


def _hint_only(peaks: dict) -> None:
    """Traced at the second size (3 rows): the hints are that call's sizes."""
    assert set(peaks) == PEAKS
    assert list(peaks["peak_sizes"].values()) == [3]
    assert peaks["measured_peak_bytes"] is None
    assert peaks["measured_peak_note"].startswith(NOT_MEASURED)
    assert "size hints" in peaks["measured_peak_note"]


@pytest.mark.parametrize("executor", ["torch", "fx"])
def test_symbolic_compile_peaks_equal_the_static_program_at_the_hints(executor):
    dynamic = retrograd.compile(_Net(), executor=executor)
    for rows in (4, 3, 5):
        dynamic(_x(rows)).backward()
    static = retrograd.compile(_Net(), executor="torch", dynamic=False)
    static(_x(3)).backward()
    for half in ("forward", "backward"):
        got, want = _peaks(dynamic.reports[half]), _peaks(static.reports[half])
        assert "symbolic" in dynamic.reports[half] and "symbolic" not in static.reports[half]
        _hint_only(got)
        assert got["predicted_peak_bytes"] == want["predicted_peak_bytes"] > 0, half
        assert got["program_peak_bytes"] == want["program_peak_bytes"] > 0, half


def test_no_checkpoint_plan_means_no_predicted_peak(monkeypatch):
    """Where the graph writes an input in place, the symbolic faces run no
    checkpoint plan (the default partition; the step's placement skipped)."""
    from retrograd.passes import checkpoint
    from retrograd.symbolic_passes import shape_env_of
    real = checkpoint.mutated_inputs
    monkeypatch.setattr(checkpoint, "mutated_inputs",   # on symbolic graphs only
                        lambda gm: real(gm) if shape_env_of(gm) is None else True)
    compiled = retrograd.compile(_Net(), executor="torch")
    for rows in (4, 3):
        compiled(_x(rows)).backward()
    peaks = _peaks(compiled.reports["backward"])
    _hint_only(peaks)
    assert peaks["predicted_peak_bytes"] is None and peaks["program_peak_bytes"] > 0
    assert "predicted_peak_bytes: null, no checkpoint plan (the default partition" \
        in peaks["measured_peak_note"]
    model = _mlp()
    step = retrograd.compile_step(model, _loss, torch.optim.SGD(model.parameters(), lr=0.1),
                                  executor="torch")
    for rows in (4, 3):
        step(*_batch(rows))
    peaks = _peaks(step.reports["step"])
    _hint_only(peaks)
    assert peaks["predicted_peak_bytes"] is None and peaks["program_peak_bytes"] > 0
    assert "no checkpoint plan (the step writes an input in place" in peaks["measured_peak_note"]


@pytest.mark.parametrize("executor", ["torch", "fx"])
def test_symbolic_step_peaks(executor):
    model = _mlp()
    step = retrograd.compile_step(model, _loss, torch.optim.SGD(model.parameters(), lr=0.1),
                                  executor=executor)
    for rows in (4, 3):
        step(*_batch(rows))
    model = _mlp()
    static = retrograd.compile_step(model, _loss, torch.optim.SGD(model.parameters(), lr=0.1),
                                    executor="torch", dynamic=False)
    static(*_batch(3))
    got = _peaks(step.reports["step"])
    _hint_only(got)
    assert got["predicted_peak_bytes"] == \
        step.reports["step"]["symbolic"]["checkpoint"]["predicted_peak_bytes"] == \
        static.reports["step"]["memory"]["predicted_peak_bytes"] > 0
    runner = step.dynamic.last.runner
    if executor == "fx":
        assert runner is None and got["program_peak_bytes"] > 0
        return
    step(*_batch(3))   # the hint size again: the plan it runs is the one reported
    assert runner.last_plan.predicted_peak == got["program_peak_bytes"] > 0
    step(*_batch(9))
    assert runner.last_plan.predicted_peak > got["program_peak_bytes"]


#: aten wraps a Python-number operand (``1 - x``, ``x * 2``, the optimizer's ``-lr``) as a
#: 0-dim float64 tensor during the op, and copies it once more to the op's dtype: 16 bytes of
#: an op's own scratch, which the run-time plan does not count (module docstring of
#: symbolic_peaks.py). Where such an op runs at the peak, measured exceeds program by that.
SCALAR_SCRATCH = 16


def _measured(memory: dict, scratch: int = 0) -> None:
    """Measured at the hints (3 rows), within ``scratch`` bytes above the plan's peak."""
    assert memory["peak_sizes"] and list(memory["peak_sizes"].values()) == [3]
    hints = ", ".join(f"{k}=3" for k in memory["peak_sizes"])
    assert memory["measured_peak_note"].startswith("measured: ")
    assert f"first call at the size hints ({hints})" in memory["measured_peak_note"]
    program, measured = memory["program_peak_bytes"], memory["measured_peak_bytes"]
    assert program > 0 and program <= measured <= program + scratch, (program, measured)


@pytest.mark.parametrize("executor", ["torch", "fx"])
def test_verify_measures_the_symbolic_program_at_the_hints(executor, tmp_path, capsys):
    """The standalone face: each half's first call at the hints is measured.
    The arena program (``torch``) peaks where its plan says, byte for byte;
    the fx graph's backward peaks inside ``1 - tanh**2``'s ``sub`` (the
    scalar operand's scratch: ``SCALAR_SCRATCH``). The dump's report.json and
    ``retrograd summary`` carry the figure; a later size leaves it as it is."""
    compiled = retrograd.compile(_Net(), executor=executor, verify=True, dump_dir=str(tmp_path))
    for rows in (4, 3, 5):
        compiled(_x(rows)).backward()
    scratch = {"forward": 0, "backward": SCALAR_SCRATCH if executor == "fx" else 0}
    for half in ("forward", "backward"):
        memory = compiled.reports[half]["memory"]
        _measured(memory, scratch[half])
        if executor == "torch":
            assert memory["measured_peak_bytes"] == memory["program_peak_bytes"], half
    assert cli.main(["summary", str(tmp_path)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("s")]
    assert len(rows) == 2
    for line in rows:
        half = line.split()[0].rsplit("-", 1)[1]
        assert line.split("  #")[0].split()[8] == \
            str(compiled.reports[half]["memory"]["measured_peak_bytes"])
        assert line.endswith("# peaks at the size hints (" + ", ".join(
            f"{k}={v}" for k, v in compiled.reports[half]["memory"]["peak_sizes"].items()) + ")")


def test_torch_compile_face_measures_its_symbolic_program(fresh_dynamo, symbolic_graphs):
    made = symbolic_graphs
    compiled = torch.compile(_Net(), backend="retrograd",
                             options={"verify": True, "executor": "torch"})
    for rows in (4, 3, 5):
        compiled(_x(rows)).backward()
    [graph] = made
    for half in ("forward", "backward"):
        memory = graph.reports[half]["memory"]
        _measured(memory)
        assert memory["measured_peak_bytes"] == memory["program_peak_bytes"], half


@pytest.mark.parametrize("executor", ["torch", "fx"])
def test_verify_measures_the_symbolic_step_at_the_hints(executor):
    """compile_step's symbolic step: measured at the traced call's sizes. The
    arena program peaks inside the loss gradient's ``sub`` of a scalar
    (``SCALAR_SCRATCH`` above its plan); the fx graph where its plan says."""
    model = _mlp()
    step = retrograd.compile_step(model, _loss, torch.optim.SGD(model.parameters(), lr=0.1),
                                  executor=executor, verify=True)
    for rows in (4, 3, 5):
        step(*_batch(rows))
    _measured(step.reports["step"]["memory"], SCALAR_SCRATCH)


def test_the_measurement_waits_for_its_call_and_says_why_when_none_is_made():
    """A backward not yet run at the hints: null, pending. A torch profiler
    already running: null, and the note says so (torch allows one)."""
    compiled = retrograd.compile(_Net(), executor="torch", verify=True)
    compiled(_x(4)).backward()
    compiled(_x(3))   # the forward alone: no backward at the hints yet
    memory = compiled.reports["backward"]["memory"]
    assert memory["measured_peak_bytes"] is None
    assert memory["measured_peak_note"].startswith(PENDING)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        compiled(_x(3)).backward()   # no new compile: the backward's first call at the hints
    memory = compiled.reports["backward"]["memory"]
    assert memory["measured_peak_bytes"] is None and memory["program_peak_bytes"] > 0
    assert memory["measured_peak_note"].startswith(
        "not measured: a torch profiler was already running")
