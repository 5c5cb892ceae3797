"""When each buffer of a kernel program is alive, and the most bytes alive at
once over such spans: what the buffer planner (``buffer_reuse``) and the
schedule (``schedule.held_peak``) both count by, so that the order the
schedule picks is judged by the lifetimes the arena will use (a
collective's input held until its wait, a view's base until the view's
last reader) and whose storage each buffer is (``storage_owners``: a
``wait_tensor`` returns its collective's tensor, so the two names are one
storage; the windows' footprint and the schedule's ``held_peak`` both
count it once by this rule)."""

from __future__ import annotations

from retrograd.ir import Program
from retrograd.passes.planning import collectives

__all__ = ["lifetimes", "live_peak", "storage_owners"]


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
    for name, wait in collectives.read_until_wait(program).items():
        last[name] = max(last.get(name, -1), wait)   # the network reads it until then
    # A view keeps its base alive: walk from the last views back to bases.
    for index in range(len(program.kernels) - 1, -1, -1):
        kernel = program.kernels[index]
        if kernel.kind == "view":
            for name in kernel.outputs:
                for base in kernel.inputs:
                    last[base] = max(last.get(base, -1), last.get(name, index))
    return {name: (first[name], last.get(name, first[name])) for name in first}


def storage_owners(program: Program) -> dict[str, str]:
    """Buffers that allocate nothing -> the buffer whose storage they are.

    ``_c10d_functional.wait_tensor`` returns the very tensor its collective
    returned (the op's schema declares no alias, so the rule is here, not
    read from it): its result is the issue's result, one storage, not two.
    The owner is followed through views (``Program.root``) and through
    other waits."""
    owners: dict[str, str] = {}
    for kernel in program.kernels:
        if collectives.is_wait(kernel) and kernel.inputs:
            owner = program.root(kernel.inputs[0])
            owner = owners.get(owner, owner)
            owners.update({name: owner for name in kernel.outputs})
    return owners


def live_peak(intervals) -> int:
    """Largest sum of sizes alive at one kernel, over (start, stop, size) intervals."""
    events: dict[int, int] = {}
    for start, stop, size in intervals:
        events[start] = events.get(start, 0) + size
        events[stop + 1] = events.get(stop + 1, 0) - size
    peak = live = 0
    for index in sorted(events):
        live += events[index]
        peak = max(peak, live)
    return peak
