"""The report's peaks (schema 4) on symbolic programs (compiler/symbolic_peaks.py):
``predicted_peak_bytes`` and ``program_peak_bytes`` at the size hints, equal to
what a static program of those sizes reports; ``measured_peak_bytes`` null
with the reason; null with a reason where no checkpoint plan ran."""

from __future__ import annotations

import pytest
import retrograd
import torch
from retrograd.symbolic_peaks import NOT_MEASURED
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
