"""The dump's ``trace.json``: the kernel order and memory timeline as a Chrome trace.

Chrome's Trace Event Format (JSON object form), which ui.perfetto.dev and
chrome://tracing open. One process per graph; on thread 1 one complete
event (``ph: "X"``) per kernel of the schedule, in order, whose ``args``
name its kind, fx nodes and the kernels it reads from; one counter (``ph:
"C"``) per memory series of ``memory_timeline`` (a track each, sampled at
every kernel and dropped to zero after the last); an instant event (``ph:
"i"``) at the peak whose ``args`` name the values held there.

A distributed step's program (``communication``: the report's field, the
schedule pass's prediction, ``passes/planning/collectives.py``) also gets
its collectives as their own track: one complete event per collective (cat
``collective``) from the kernel that issues it to the end of the kernel that
waits for it, the window in which the schedule lets compute overlap it; its
``args`` carry the op, ranks, bytes, wire bytes and the bandwidth model's
predicted start, end and exposed seconds. Collectives in flight at once get
separate lanes (threads ``collectives in flight``, ``... 2``), since a
thread's complete events must nest.

No time was measured when the dump is written, so the time axis is the
schedule: kernel ``t`` occupies ``[t, t + 1)`` milliseconds (``otherData``
says so). ``python program.py --trace PATH`` rewrites the same trace with
measured durations (``retime``).
"""

from __future__ import annotations

from retrograd.memory_timeline import HELD, SERIES, Timeline

__all__ = ["COLLECTIVES_TID", "KERNELS_TID", "PID", "chrome_trace", "retime"]

PID, KERNELS_TID = 1, 1
COLLECTIVES_TID = 2   # the first lane of collectives; later lanes count up from it
STEP_US = 1000.0   # one kernel per millisecond of the schedule axis


def _kernel_events(timeline: Timeline, starts: list[float], durations: list[float]) -> list:
    return [{"ph": "X", "name": step.name, "cat": step.kind, "pid": PID, "tid": KERNELS_TID,
             "ts": starts[step.index], "dur": durations[step.index],
             "args": {"position": step.index, "kind": step.kind, "fx_nodes": list(step.nodes),
                      "reads_from": list(step.producers)}}
            for step in timeline.steps]


def _counter_events(timeline: Timeline, starts: list[float], end: float) -> list:
    events = []
    for name, values in timeline.series().items():
        events += [{"ph": "C", "name": name, "pid": PID, "ts": starts[index],
                    "args": {"bytes": value}} for index, value in enumerate(values)]
        events.append({"ph": "C", "name": name, "pid": PID, "ts": end, "args": {"bytes": 0}})
    return events


def _peak_event(timeline: Timeline, starts: list[float]) -> list:
    peak = timeline.peak(HELD)
    if peak is None:
        return []
    index, nbytes = peak
    return [{"ph": "i", "s": "p", "name": f"peak: {nbytes:,} bytes {HELD}", "pid": PID,
             "tid": KERNELS_TID, "ts": starts[index],
             "args": {"position": index, "kernel": timeline.steps[index].name,
                      "bytes": nbytes,
                      "held": {i.name: i.nbytes for i in timeline.alive_at(index, HELD)}}}]


def _spans(rows: list[dict], count: int) -> list[tuple[int, int]]:
    """Each collective's ``[issue, wait]`` kernel positions (an unwaited one
    to the last kernel)."""
    return [(row["issued_at"], count - 1 if row["waited_at"] is None else row["waited_at"])
            for row in rows]


def _lanes(spans: list[tuple[int, int]]) -> list[int]:
    """A lane per collective: the first whose last span ended before it starts."""
    ends: list[int] = []
    lanes = []
    for start, stop in spans:
        lane = next((k for k, end in enumerate(ends) if end < start), len(ends))
        ends[lane:lane + 1] = [stop]
        lanes.append(lane)
    return lanes


def _collective_events(communication: dict | None, starts: list[float],
                       count: int) -> list:
    """The collectives' track (module docstring), or nothing."""
    rows = (communication or {}).get("collectives") or []
    spans = _spans(rows, count)
    lanes = _lanes(spans)
    events = [{"ph": "M", "name": "thread_name", "pid": PID, "tid": COLLECTIVES_TID + lane,
               "args": {"name": "collectives in flight (issue to wait)"
                        + (f" {lane + 1}" if lane else "")}}
              for lane in range(max(lanes, default=-1) + 1)]
    for number, (row, (start, stop), lane) in enumerate(zip(rows, spans, lanes)):
        args = {key: row[key] for key in ("op", "ranks", "bytes", "wire_bytes", "issued_at",
                                          "waited_at", "kernels_between")}
        args.update(number=number, predicted_start_seconds=row["start_seconds"],
                    predicted_end_seconds=row["end_seconds"],
                    predicted_exposed_seconds=row["exposed_seconds"])
        events.append({"ph": "X", "name": f"#{number} {row['op']} {row['bytes']:,} B",
                       "cat": "collective", "pid": PID, "tid": COLLECTIVES_TID + lane,
                       "ts": starts[start], "dur": starts[stop + 1] - starts[start],
                       "args": args})
    return events


def chrome_trace(graph_id: str, timeline: Timeline, communication: dict | None = None) -> dict:
    """The trace of one program, on the schedule's time axis; with the
    report's ``communication``, its collectives on a track of their own."""
    count = len(timeline.steps)
    starts = [index * STEP_US for index in range(count + 1)]
    metadata = [
        {"ph": "M", "name": "process_name", "pid": PID, "tid": 0,
         "args": {"name": f"retrograd {graph_id}"}},
        {"ph": "M", "name": "thread_name", "pid": PID, "tid": KERNELS_TID,
         "args": {"name": "kernels in schedule order"}},
    ]
    return {
        "traceEvents": metadata + _kernel_events(timeline, starts, [STEP_US] * count)
        + _counter_events(timeline, starts[:count], count * STEP_US)
        + _peak_event(timeline, starts) + _collective_events(communication, starts, count),
        "displayTimeUnit": "ms",
        "otherData": {"graph_id": graph_id, "time_axis": "schedule: kernel t occupies "
                      "[t, t + 1) ms; nothing was measured (python program.py --trace "
                      "writes measured times)", "counters": SERIES},
    }


def retime(trace: dict, durations_us: list[float]) -> dict:
    """``trace`` (as ``chrome_trace`` wrote it) with kernel ``t`` lasting
    ``durations_us[t]`` microseconds, back to back; counters and the peak move along."""
    starts = [0.0]
    for duration in durations_us:
        starts.append(starts[-1] + duration)
    events = []
    for event in trace["traceEvents"]:
        event = dict(event)
        if event["ph"] == "X" and event.get("cat") == "collective":
            first, last = _spans([event["args"]], len(durations_us))[0]
            event["ts"], event["dur"] = starts[first], starts[last + 1] - starts[first]
        elif event["ph"] == "X":
            event["ts"], event["dur"] = starts[event["args"]["position"]], \
                durations_us[event["args"]["position"]]
        elif event["ph"] in ("C", "i"):
            event["ts"] = starts[min(round(event["ts"] / STEP_US), len(durations_us))]
        events.append(event)
    other = dict(trace.get("otherData", {}),
                 time_axis="measured by python program.py: kernels back to back, each its "
                           "block's time (clock read between kernels)")
    return dict(trace, traceEvents=events, otherData=other)
