"""The memory timeline of one program, for the dump's page and its trace export.

The x-axis is the program's schedule: position ``t`` is kernel ``t`` of
``program.kernels`` (views included), the same numbers ``program.py``'s
``# t:`` comments, ``memory_plan.txt``'s first/last use and the kernel strip
of ``index.html`` use. Every figure is a sum of named intervals (a value,
or an arena, holding ``nbytes`` from kernel ``start`` to ``stop``), so the
page can name what makes up the peak and the names always add up to it.

The series, each named for what it counts:

- ``held by the program``: the arenas taken, the storages the program
  allocates outside them (extern results, escaping outputs from their birth
  on, a buffer written in place extending the storage it reuses) and the
  scratch of extern convolutions, found by one probe call of the same
  signature on the CPU (``extern_scratch.py``; an estimate, so labelled,
  where it cannot probe). Inputs are not counted (the caller holds most of
  them). It is buffer_reuse's footprint prediction (``buffer_reuse.footprint``),
  decomposed, except that the planner chose its windows with the scratch
  estimated (bytes read + written); a prediction, not a measurement, and on
  the zoo under the CPU default it equals the measured peak (report schema 4,
  ``memory.measured_peak_bytes``). Not counted: temporaries inside a fused
  kernel that the torch program runs as several torch calls.
- ``arenas held``: bytes of the arenas taken while the kernel runs.
- ``arena bytes in use``: bytes of the arenas under a live planned buffer
  (how full the arenas are). A buffer written in place takes the slot of one
  that dies at the same kernel, so the two share bytes there: intervals
  placed in an arena (``Interval.offset``) count each byte once.
- ``inputs still referenced``: program inputs the program has not yet
  dropped (the caller may hold them as well).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from retrograd import extern_scratch
from retrograd.ir import Program
from retrograd.passes import buffer_reuse
from retrograd.passes.op_classes import SCRATCH_OPS
from retrograd.passes.planning import windows

__all__ = ["SERIES", "Interval", "Step", "Timeline", "build"]

HELD, ARENAS, IN_ARENAS, INPUTS = ("held by the program", "arenas held",
                                   "arena bytes in use", "inputs still referenced")

#: series name -> what it counts (the page's legend and the trace's description)
SERIES = {
    HELD: "arenas + the program's own allocations outside them + extern scratch (probed, "
          "else estimated) (inputs not counted; buffer_reuse's footprint prediction)",
    ARENAS: "bytes of the arenas taken",
    IN_ARENAS: "bytes of the arenas under a live planned buffer (bytes shared in place "
               "count once)",
    INPUTS: "program inputs not yet dropped by the program (the caller may hold them too)",
}


@dataclass(frozen=True)
class Interval:
    """``nbytes`` held from kernel ``start`` to kernel ``stop`` (both included);
    a planned buffer also has its place: ``arena`` and byte ``offset``."""

    name: str
    what: str
    nbytes: int
    start: int
    stop: int
    arena: int | None = None
    offset: int | None = None

    def covers(self, index: int) -> bool:
        return self.start <= index <= self.stop


@dataclass(frozen=True)
class Step:
    """One kernel of the schedule: what the strip draws at its position."""

    index: int
    kind: str
    name: str
    nodes: tuple[str, ...]
    producers: tuple[int, ...]   # positions of the kernels whose outputs it reads


@dataclass
class Timeline:
    """The schedule and the intervals every series sums."""

    steps: list[Step]
    intervals: dict[str, list[Interval]] = field(default_factory=dict)

    def series(self) -> dict[str, list[int]]:
        """Bytes at each kernel, per series."""
        return {name: [_bytes([i for i in spans if i.covers(t)]) for t in range(len(self.steps))]
                for name, spans in self.intervals.items()}

    def peak(self, name: str = HELD) -> tuple[int, int] | None:
        """(position, bytes) of the series' largest value (the first if tied), or None."""
        values = self.series().get(name) or []
        if not values:
            return None
        top = max(values)
        return values.index(top), top

    def alive_at(self, index: int, name: str = HELD) -> list[Interval]:
        """The intervals of one series alive at ``index``, largest first: they add up
        to the series' value there."""
        alive = [i for i in self.intervals.get(name, []) if i.covers(index)]
        return sorted(alive, key=lambda i: (-i.nbytes, i.name))


def _bytes(alive: list[Interval]) -> int:
    """Their bytes; those placed in an arena count the union of their byte ranges."""
    ranges = sorted((i.arena, i.offset, i.offset + i.nbytes) for i in alive
                    if i.offset is not None)
    total = sum(i.nbytes for i in alive if i.offset is None)
    arena, end = None, 0
    for place, start, stop in ranges:
        if place != arena:
            arena, end = place, 0
        total += max(0, stop - max(start, end))
        end = max(end, stop)
    return total


def _clip(start: int, stop: int, count: int) -> tuple[int, int]:
    return max(start, 0), min(stop, count - 1)


def _storages(program: Program, spans, count: int) -> list[Interval]:
    """The program's own storages outside the arenas, by the rule the window
    search uses (``planning/windows.storage_lives``)."""
    planned = {name for name, buffer in program.buffers.items() if buffer.offset is not None}
    return [Interval(root, f"{program.buffers[root].role} (own allocation)",
                     program.buffers[root].nbytes, *_clip(first, last, count))
            for root, (first, last) in windows.storage_lives(program, spans, planned).items()]


def _held(program: Program, spans, count: int) -> list[Interval]:
    arenas = [Interval(f"arena {number}", f"arena, kernels {w.start}..{w.stop}", w.nbytes,
                       *_clip(w.start, w.stop, count))
              for number, w in enumerate(program.arenas)]
    scratch = [Interval(f"{kernel.name} scratch", found.what, found.nbytes, index, index)
               for index, kernel in enumerate(program.kernels)
               if kernel.kind == "extern" and any(op in kernel.op for op in SCRATCH_OPS)
               for found in [extern_scratch.scratch(program, kernel)]]
    return arenas + _storages(program, spans, count) + scratch


def _steps(program: Program) -> list[Step]:
    """Every kernel in schedule order; arcs come from the kernel that wrote the
    storage read (views are read through to their base's writer)."""
    writer: dict[str, int] = {}
    for index, kernel in enumerate(program.kernels):
        if kernel.kind != "view":
            writer.update({name: index for name in kernel.outputs})
    return [Step(index, str(kernel.kind), kernel.name, tuple(kernel.node_names),
                 tuple(sorted({writer[program.root(n)] for n in kernel.inputs
                               if writer.get(program.root(n), index) < index})))
            for index, kernel in enumerate(program.kernels)]


def build(program: Program) -> Timeline:
    """The timeline of a planned program (buffer_reuse has run, or not: then
    there are no arenas and every storage is the program's own)."""
    spans = buffer_reuse.lifetimes(program)
    count = len(program.kernels)
    in_arenas = [Interval(name, f"in arena {b.arena} at offset {b.offset}", b.nbytes,
                          *_clip(*spans[name], count), b.arena, b.offset)
                 for name, b in program.buffers.items() if b.offset is not None and name in spans]
    inputs = [Interval(name, "input", program.buffers[name].nbytes, *_clip(*spans[name], count))
              for name in program.inputs if name in program.buffers and name in spans]
    held = _held(program, spans, count)   # the arenas come first
    return Timeline(_steps(program), {
        HELD: held, ARENAS: held[:len(program.arenas)], IN_ARENAS: in_arenas,
        INPUTS: [i for i in inputs if i.start <= i.stop]})
