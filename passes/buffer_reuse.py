"""Buffer lifetimes and the memory plan.

What it does: computes, over the kernel schedule, when every buffer is
first written and last read (a view extends its base's life), and tells the
wrapper to free each value right after its last use. In this first form
every temporary is its own allocation: no offsets, no reuse, and the stats
say so. It also computes the liveness lower bound, the largest sum of
temporary bytes alive at any one kernel, which any planner must reach.

Assumes kernels in schedule order. Guarantees that no buffer is freed
before its last reader, and that program outputs are never freed.
"""

from __future__ import annotations

from retrograd.ir import Program

__all__ = ["run", "lifetimes", "live_lower_bound"]


def lifetimes(program: Program) -> dict[str, tuple[int, int]]:
    """(first, last) kernel index per buffer; -1 means alive on entry."""
    first: dict[str, int] = {name: -1 for name in program.inputs}
    first.update({name: -1 for name in program.constants})
    last: dict[str, int] = {name: -1 for name in first}
    for index, kernel in enumerate(program.kernels):
        for name in kernel.outputs:
            first.setdefault(name, index)
            last[name] = max(last.get(name, index), index)
        for name in kernel.inputs:
            last[name] = max(last.get(name, -1), index)
    end = len(program.kernels)
    for name in program.outputs:
        if isinstance(name, str):
            last[name] = end
    # A view keeps its base alive: walk from the last views back to bases.
    for index in range(len(program.kernels) - 1, -1, -1):
        kernel = program.kernels[index]
        if kernel.kind == "view":
            for name in kernel.outputs:
                for base in kernel.inputs:
                    last[base] = max(last.get(base, -1), last.get(name, index))
    return {name: (first[name], last.get(name, first[name])) for name in first}


def live_lower_bound(program: Program, spans: dict[str, tuple[int, int]]) -> int:
    """Largest sum of live temporary bytes at any kernel of the schedule."""
    peak = 0
    for index in range(len(program.kernels)):
        live = sum(program.buffers[name].nbytes for name, (start, stop) in spans.items()
                   if name in program.buffers and program.buffers[name].role == "temporary"
                   and start <= index <= stop)
        peak = max(peak, live)
    return peak


def run(program: Program, ctx) -> dict:
    spans = lifetimes(program)
    frees: dict[int, list[str]] = {}
    outputs = {name for name in program.outputs if isinstance(name, str)}
    for name, (start, stop) in spans.items():
        buffer = program.buffers.get(name)
        if name in outputs or name in program.constants:
            continue
        if buffer is None and name not in program.inputs:
            continue
        frees.setdefault(stop, []).append(name)
        if buffer is not None:
            buffer.first_use, buffer.last_use = start, stop
    program.frees = {index: sorted(names) for index, names in sorted(frees.items())}
    temporaries = [b for b in program.buffers.values() if b.role == "temporary"]
    total = sum(buffer.nbytes for buffer in temporaries)
    return {
        "strategy": "one allocation per temporary, freed after last use",
        "temporaries": len(temporaries),
        "bytes_without_reuse": total,
        "bytes_reused": 0,
        "arena_bytes": None,
        "live_lower_bound_bytes": live_lower_bound(program, spans),
        "unplanned_bytes": total,
    }
