"""A distributed step's collectives in the dump's ``trace.json`` (the Chrome /
Perfetto trace, compiler/perfetto.py): their own track, from the schedule's
predicted communication timeline, in one process (tests/test_distributed.py
checks a real two-rank dump)."""

from __future__ import annotations

import jsonschema
import pytest
import torch
from pass_helpers import context
from retrograd import memory_timeline
from retrograd.passes import schedule
from retrograd.passes.planning import collectives, comm_timeline
from retrograd.perfetto import COLLECTIVES_TID, KERNELS_TID, STEP_US, chrome_trace, retime
from test_collectives_schedule import two_buckets
from test_dump_page import TRACE_SCHEMA

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch built without torch.distributed")


def _traced(monkeypatch):
    monkeypatch.setattr(comm_timeline, "group_size", lambda kernel: 2)
    program = two_buckets()
    summary = schedule.run(program, context()).stats["communication"]
    return program, summary, chrome_trace("g0-step", memory_timeline.build(program), summary)


def test_collectives_are_a_track_of_their_own_spanning_issue_to_wait(monkeypatch):
    """Each all-reduce is one complete event from the kernel that issues it
    to the end of the kernel that waits for it; the two overlap in the
    schedule, so they sit in two lanes (a thread's events must nest); the
    kernels' track is unchanged."""
    program, summary, trace = _traced(monkeypatch)
    jsonschema.validate(trace, TRACE_SCHEMA)
    events = trace["traceEvents"]
    kernels = [e for e in events if e["ph"] == "X" and e["tid"] == KERNELS_TID]
    assert [e["name"] for e in kernels] == [k.name for k in program.kernels]
    spans = [e for e in events if e.get("cat") == "collective"]
    rows = summary["collectives"]
    assert len(spans) == len(rows) == 2
    for event, row in zip(spans, rows):
        assert program.kernels[row["issued_at"]].name.startswith("all_reduce")
        assert collectives.is_wait(program.kernels[row["waited_at"]])
        assert event["ts"] == row["issued_at"] * STEP_US
        assert event["ts"] + event["dur"] == (row["waited_at"] + 1) * STEP_US
        assert event["args"]["bytes"] == row["bytes"] == 4000
        assert event["args"]["predicted_exposed_seconds"] == row["exposed_seconds"]
        assert event["args"]["wire_bytes"] == row["wire_bytes"] == 4000   # 2 (n - 1) / n
    first, second = spans
    assert second["ts"] < first["ts"] + first["dur"], "the schedule overlaps them"
    assert {first["tid"], second["tid"]} == {COLLECTIVES_TID, COLLECTIVES_TID + 1}
    names = {e["tid"]: e["args"]["name"] for e in events
             if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names[COLLECTIVES_TID] == "collectives in flight (issue to wait)"
    assert names[COLLECTIVES_TID + 1] == "collectives in flight (issue to wait) 2"


def test_measured_retime_moves_the_collectives_with_their_kernels(monkeypatch):
    """``program.py --trace`` (``retime``): a collective spans its issue and
    wait kernels' measured times."""
    program, summary, trace = _traced(monkeypatch)
    durations = [10.0 * (index + 1) for index in range(len(program.kernels))]
    measured = retime(trace, durations)
    jsonschema.validate(measured, TRACE_SCHEMA)
    starts = [sum(durations[:index]) for index in range(len(durations) + 1)]
    for event, row in zip([e for e in measured["traceEvents"] if e.get("cat") == "collective"],
                          summary["collectives"]):
        assert event["ts"] == starts[row["issued_at"]]
        assert event["ts"] + event["dur"] == starts[row["waited_at"] + 1]


def test_a_program_without_collectives_has_no_collective_track(monkeypatch):
    program, _, _ = _traced(monkeypatch)
    trace = chrome_trace("g0-step", memory_timeline.build(program), None)
    assert not [e for e in trace["traceEvents"] if e.get("tid", 0) >= COLLECTIVES_TID]
