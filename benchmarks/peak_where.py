"""Where a step's measured peak happens: the source lines running at the peak.

For one zoo model and one column of ``benchmarks/peaks.py`` (eager, a
retrograd face...), runs one step after two warm-ups under the profiler with
allocation events and Python stacks, finds the instant live torch CPU memory
peaks (the same running sum as ``measuring.profiled_peak``), and prints the
Python frames and aten ops open at that instant, innermost last, with the
text of the line for generated programs (``program.py``, the torch
program). Also the few highest local maxima of the curve, each with its
innermost program line, to see which kernels come close.

    python benchmarks/peak_where.py lora "retrograd.compile" [--executor torch]
"""

from __future__ import annotations

import argparse
import bisect
import linecache
import re
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from peaks import _runner
from zoo import clone_inputs

FRAME = re.compile(r"^(?P<file>.+)\((?P<line>\d+)\): (?P<function>.+)$")


def _events(run):
    """The profiler's events, and ``[(time_ns, file, line)]`` for every line run
    in a generated ``program.py`` (the profiler's stacks name functions only)."""
    lines = []

    def trace(frame, event, arg):
        if not Path(frame.f_code.co_filename).name.startswith("torch_program_"):
            return None

        def local(frame, event, arg):
            if event == "line":
                lines.append((time.time_ns(), frame.f_code.co_filename, frame.f_lineno,
                              _locals(frame)))
            return local
        return local
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True, with_stack=True) as profiler:
        sys.settrace(trace)
        try:
            run()
        finally:
            sys.settrace(None)
    return list(profiler.profiler.kineto_results.events()), lines


def _locals(frame) -> dict[str, int]:
    """The program's tensor variables alive on this line: name -> storage bytes
    (a storage once, under the first name that holds it)."""
    found, seen = {}, set()
    for name, value in frame.f_locals.items():
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                found[name] = storage.nbytes()
    return found


def _curve(events):
    """``[(time_ns, live_bytes)]`` after each allocation event."""
    live, points = 0, []
    for moment, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events
                               if e.name() == "[memory]"):
        live += nbytes
        points.append((moment, live))
    return points


def _open_at(events, time: int) -> list:
    """Events (frames, ops) open at ``time``, outermost first."""
    found = [e for e in events if e.name() != "[memory]"
             and e.start_ns() <= time <= e.start_ns() + e.duration_ns()]
    return sorted(found, key=lambda e: (e.start_ns(), -e.duration_ns()))


def _describe(event) -> str:
    match = FRAME.match(event.name())
    if match and match["file"].endswith(".py") and "program" in match["file"]:
        text = linecache.getline(match["file"], int(match["line"])).strip()
        return f"{Path(match['file']).parent.name}/program.py:{match['line']}: {text}"
    return event.name()


def _program_line(lines, time: int) -> str:
    """The generated program's line running at ``time`` (the last begun)."""
    index = bisect.bisect_right([line[0] for line in lines], time) - 1
    if index < 0:
        return "?"
    _, path, number, _ = lines[index]
    text = linecache.getline(path, number).strip()
    kind = Path(path).name.split("_")[-2].split("-")[-1]   # forward, backward, step
    return f"{kind}:{number}: {text}"


def report(name: str, label: str, executor: str | None, maxima: int) -> None:
    warnings.simplefilter("ignore")
    run, inputs = _runner(name, label, executor)
    for _ in range(2):
        run(clone_inputs(inputs))
    batch = clone_inputs(inputs)
    events, lines = _events(lambda: run(batch))
    curve = _curve(events)
    instant, peak = max(curve, key=lambda point: point[1])
    print(f"{name} / {label}: peak {peak:,} bytes")
    for event in _open_at(events, instant):
        if "profiler" not in event.name() and "built-in" not in event.name():
            print("   ", _describe(event))
    print("    program line:", _program_line(lines, instant))
    index = bisect.bisect_right([line[0] for line in lines], instant) - 1
    if index >= 0:
        alive = lines[index][3]
        print(f"    program variables alive there: {sum(alive.values()):,} bytes:",
              ", ".join(f"{name} {nbytes:,}" for name, nbytes in
                        sorted(alive.items(), key=lambda item: -item[1])))
    tops = [curve[i] for i in range(len(curve))
            if (i + 1 == len(curve) or curve[i + 1][1] < curve[i][1])
            and (i == 0 or curve[i - 1][1] <= curve[i][1])]
    print(f"highest {maxima} local maxima:")
    for moment, live in sorted(tops, key=lambda point: -point[1])[:maxima]:
        print(f"  {live:>9,}  {_program_line(lines, moment)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("label", help="a column of benchmarks/peaks.py")
    parser.add_argument("--executor", default=None)
    parser.add_argument("--maxima", type=int, default=8)
    args = parser.parse_args()
    report(args.model, args.label, args.executor, args.maxima)
    return 0


if __name__ == "__main__":
    sys.exit(main())
