"""The report's three peaks (``memory.predicted_peak_bytes``,
``program_peak_bytes``, ``measured_peak_bytes`` with ``measured_peak_note``;
report schema 4, compiler/report.py).

- ``predicted_peak_bytes`` is the checkpoint plan's figure (its stats, and
  the trade-off's ``current`` point when dumping), the same in the forward
  and backward reports.
- ``program_peak_bytes`` is the peak of the memory timeline's ``held by the
  program`` series, the one the dump page charts.
- ``measured_peak_bytes`` exists only where retrograd ran the program while
  compiling (``verify=True``), else null with a note saying why. The stated
  relation on the zoo's MLP and attention block under the CPU default (the
  torch program, no convolution): measured equals ``program_peak_bytes``
  exactly (the same scope: what the program allocates, inputs excluded),
  and both are at most ``predicted_peak_bytes``, the graph-level figure over
  forward and backward before fusion. On the CNN too, measured equals
  ``program_peak_bytes`` (asserted within 5%): the timeline's convolution
  scratch is probed (compiler/extern_scratch.py). The plan's predicted peak
  does not count extern scratch and stays below both there.
"""

from __future__ import annotations

import pytest
import retrograd
import torch
from retrograd import extern_scratch, graph_compiler, memory_timeline, report
from retrograd.measured_peak import HOW, NOT_RUN
from zoo import ZOO, clone_inputs

HALVES = ("forward", "backward")


def _compiled(name: str, monkeypatch, **options):
    """The zoo model compiled and run once: (reports, {half: timeline peak})."""
    timeline_peaks = {}

    def build(half, *args, **kwargs):
        program = args[1]
        timeline_peaks[half] = memory_timeline.build(program).peak(memory_timeline.HELD)[1]
        return report.build_report(half, *args, **kwargs)
    monkeypatch.setattr(graph_compiler, "build_report", build)
    entry = ZOO[name]
    torch.manual_seed(0)
    model, inputs = entry.model(), entry.inputs()
    compiled = retrograd.compile(model, executor="torch", **options)
    entry.run(compiled, clone_inputs(inputs)).backward()
    return compiled.reports, timeline_peaks


def _checkpoint_stats(reports) -> dict:
    [stats] = [p["stats"] for p in reports["forward"]["passes"] if p["name"] == "checkpoint"]
    return stats


def test_the_peaks_are_the_plan_and_timeline_figures_and_unmeasured_without_verify(
        monkeypatch, tmp_path):
    reports, timeline_peaks = _compiled("mlp", monkeypatch, dump_dir=str(tmp_path))
    stats = _checkpoint_stats(reports)
    assert reports["forward"]["schema"] == report.SCHEMA == 4
    for half in HALVES:
        memory = reports[half]["memory"]
        assert memory["predicted_peak_bytes"] == stats["predicted_peak_bytes"] > 0
        assert memory["predicted_peak_bytes"] == \
            reports[half]["pareto"]["current"]["predicted_peak_bytes"]
        assert memory["program_peak_bytes"] == timeline_peaks[half] > 0
        assert memory["measured_peak_bytes"] is None
        assert memory["measured_peak_note"] == NOT_RUN.note
        assert "verify=True" in memory["measured_peak_note"]


@pytest.mark.parametrize("name", ["mlp", "attention_block"])
def test_the_measured_peak_equals_the_program_peak_under_verify(name, monkeypatch):
    reports, timeline_peaks = _compiled(name, monkeypatch, verify=True)
    for half in HALVES:
        memory = reports[half]["memory"]
        assert memory["measured_peak_note"] == HOW
        assert memory["measured_peak_bytes"] == memory["program_peak_bytes"] \
            == timeline_peaks[half] > 0, (half, memory)
        assert memory["measured_peak_bytes"] <= memory["predicted_peak_bytes"], (half, memory)


def test_the_step_program_is_measured_under_verify():
    entry = ZOO["mlp"]
    torch.manual_seed(0)
    model, inputs = entry.model(), entry.inputs()
    step = retrograd.compile_step(model, lambda m, *batch: entry.run(m, batch),
                                  torch.optim.SGD(model.parameters(), lr=0.1), verify=True,
                                  executor="torch")
    step(*clone_inputs(inputs))
    memory = step.reports["step"]["memory"]
    assert memory["measured_peak_note"] == HOW
    assert memory["measured_peak_bytes"] == memory["program_peak_bytes"] > 0
    [stats] = [p["stats"] for p in step.reports["step"]["passes"] if p["name"] == "checkpoint"]
    assert memory["predicted_peak_bytes"] == stats["predicted_peak_bytes"] > 0


def test_a_running_profiler_leaves_the_peak_unmeasured_and_says_so(monkeypatch):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        reports, _ = _compiled("mlp", monkeypatch, verify=True)
    for half in HALVES:
        memory = reports[half]["memory"]
        assert memory["measured_peak_bytes"] is None
        assert memory["measured_peak_note"] == "not measured: a torch profiler was already running"
        assert memory["program_peak_bytes"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2_tiny", "lora"])
def test_the_measured_peak_is_near_the_program_peak_on_transformers(name, monkeypatch):
    """Measured after 7e26782: gpt2_tiny 1.12x (forward) and 1.00x (backward)
    of ``program_peak_bytes``, the LoRA model 0.93x and 0.92x: within 15%,
    and below the plan's ``predicted_peak_bytes``. (The CNN is not: its
    convolutions' scratch was an estimate in the timeline then, and measured
    2.6-3.2x: ``test_the_cnn_program_peak_counts_the_probed_convolution_scratch``.)"""
    reports, _ = _compiled(name, monkeypatch, verify=True)
    for half in HALVES:
        memory = reports[half]["memory"]
        ratio = memory["measured_peak_bytes"] / memory["program_peak_bytes"]
        assert 0.85 <= ratio <= 1.15, (half, ratio, memory)
        assert memory["measured_peak_bytes"] <= memory["predicted_peak_bytes"], (half, memory)


def test_the_cnn_program_peak_counts_the_probed_convolution_scratch(monkeypatch):
    """oneDNN's convolutions allocate padded weights and a scratchpad; with
    them probed, the timeline's peak is the measured one (both halves peak
    inside a convolution: 19,352 and 28,644 bytes on this project's CPU with
    two threads, where the estimate gave 6,064 and 10,996)."""
    timelines = {}

    def build(half, *args, **kwargs):
        timelines[half] = memory_timeline.build(args[1])
        return report.build_report(half, *args, **kwargs)
    monkeypatch.setattr(graph_compiler, "build_report", build)
    entry = ZOO["cnn"]
    torch.manual_seed(0)
    model, inputs = entry.model(), entry.inputs()
    compiled = retrograd.compile(model, executor="torch", verify=True)
    entry.run(compiled, clone_inputs(inputs)).backward()
    for half in HALVES:
        memory = compiled.reports[half]["memory"]
        assert memory["measured_peak_note"] == HOW
        measured, program = memory["measured_peak_bytes"], memory["program_peak_bytes"]
        assert 0.95 <= measured / program <= 1.05, (half, memory)
        position, _ = timelines[half].peak()
        scratch = [i for i in timelines[half].alive_at(position) if "scratch" in i.name]
        assert scratch and scratch[0].what == extern_scratch.MEASURED, (half, scratch)
