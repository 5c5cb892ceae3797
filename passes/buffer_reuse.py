"""Buffer lifetimes and the memory plan: one arena per program.

What it does: computes, over the kernel schedule, when every buffer is first
written and last read (a view extends its base's life), then places every
*planned* buffer at an offset of one arena so that buffers alive at the same
time never overlap. Planned buffers are the temporaries written by generated
kernels and by extern calls that have an ``out=`` form (matrix products);
values that escape the call (outputs, values saved for the backward, and
whatever storage their views use) get their own storage, and other extern
results stay with torch's allocator (``unplanned_bytes``). Everything is
freed (or stops being used) right after its last reader.

Offsets: two greedy planners, keep the smaller arena -- greedy by size
(Pisarchyk & Lee, "Efficient Memory Management for Deep Neural Net
Inference", 2020; XLA's heap simulator's decreasing-size best-fit) and the
same best-fit rule in order of first use. In place: a pointwise kernel's
output takes the slot of an input that dies there when the two have the same
shape, strides and dtype and the kernel reads that input element for element
at its own index (so no program reads what another already overwrote).

The liveness lower bound is the largest sum of (aligned) planned bytes alive
at one kernel, computed from lifetimes alone (buffers chained in place count
once: they share one slot); no planner can beat it. Offsets are aligned to
``ALIGN`` bytes for vector loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from retrograd.ir import Buffer, Kernel, Program

__all__ = ["run", "lifetimes", "live_lower_bound", "plan_offsets", "Slot", "ALIGN",
           "OUT_VARIANTS", "overlapping"]

ALIGN = 16

#: Extern ops run with ``out=`` into the arena (the aten overload that has it).
OUT_VARIANTS = {"aten.mm.default": "out", "aten.bmm.default": "out",
                "aten.addmm.default": "out"}


def align(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


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


def planned_buffers(program: Program) -> list[str]:
    """Temporaries the arena holds (see the module docstring)."""
    escaping = program.escaping()
    names = []
    for kernel in program.kernels:
        if kernel.kind == "triton" or kernel.kind == "extern" and kernel.op in OUT_VARIANTS \
                and len(kernel.outputs) == 1 and len(kernel.nodes) == 1:
            names += [n for n in kernel.outputs if program.buffers[n].role == "temporary"
                      and n not in escaping]
    return names


def live_lower_bound(program: Program, spans: dict[str, tuple[int, int]],
                     names: list[str] | None = None) -> int:
    """Largest sum of aligned planned bytes alive at any kernel of the schedule."""
    names = planned_buffers(program) if names is None else names
    return _live_peak((*spans[name], align(program.buffers[name].nbytes)) for name in names)


def _live_peak(intervals) -> int:
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


@dataclass
class Slot:
    """One arena region: a buffer, or buffers chained in place."""

    names: list[str]
    start: int
    stop: int
    size: int
    offset: int = -1


def overlapping(a: Slot, b: Slot) -> bool:
    """Alive at the same kernel and sharing bytes of the arena."""
    in_time = a.start <= b.stop and b.start <= a.stop
    return in_time and a.offset < b.offset + b.size and b.offset < a.offset + a.size


def _place(slots: list[Slot], order: list[Slot]) -> int:
    """Best-fit: the smallest gap among time-overlapping placed slots, else the top."""
    placed: list[Slot] = []
    top = 0
    for slot in order:
        busy = sorted((p for p in placed if p.start <= slot.stop and slot.start <= p.stop),
                      key=lambda p: p.offset)
        best, best_gap, cursor = None, None, 0
        for other in busy:
            gap = other.offset - cursor
            if gap >= slot.size and (best_gap is None or gap < best_gap):
                best, best_gap = cursor, gap
            cursor = max(cursor, other.offset + other.size)
        slot.offset = best if best is not None else cursor
        top = max(top, slot.offset + slot.size)
        placed.append(slot)
    return top


def plan_offsets(slots: list[Slot]) -> tuple[int, str]:
    """Assign offsets with each strategy, keep the smallest arena."""
    strategies = {
        "greedy by size (best fit)": lambda: sorted(
            slots, key=lambda s: (-s.size, s.start - s.stop, s.start)),
        "first use order (best fit)": lambda: sorted(slots, key=lambda s: (s.start, -s.size)),
    }
    best_size, best_name, best_offsets = None, None, None
    for name, order in strategies.items():
        size = _place(slots, order())
        if best_size is None or size < best_size:
            best_size, best_name = size, name
            best_offsets = [slot.offset for slot in slots]
    for slot, offset in zip(slots, best_offsets):
        slot.offset = offset
    return best_size or 0, best_name or "none"


def _reads_in_place(program: Program, kernel: Kernel, source: Buffer, target: Buffer,
                    support) -> bool:
    """Every read of ``source`` in ``kernel`` is at the index ``target`` is written."""
    if kernel.kind != "triton" or kernel.is_reduction or not kernel.name.startswith("pointwise"):
        return False
    if (source.shape, source.strides, source.dtype) != (target.shape, target.strides,
                                                        target.dtype):
        return False
    if any(program.root(name) == source.name and name != source.name for name in kernel.inputs):
        return False   # a view of it is read too, at other indices
    for node in kernel.nodes:
        for arg in node.all_input_nodes:
            if arg.name != source.name:
                continue
            if tuple(node.meta["val"].shape) != source.shape or support.reads_by_index(node):
                return False
    return True


def _slots(program: Program, spans, names: list[str], support) -> tuple[list[Slot], int]:
    """One slot per planned buffer, chaining in-place reuse; bytes reused in place."""
    slot_of: dict[str, Slot] = {}
    slots: list[Slot] = []
    reused = 0
    planned = set(names)
    for index, kernel in enumerate(program.kernels):
        for name in kernel.outputs:
            if name not in planned:
                continue
            buffer = program.buffers[name]
            start, stop = spans[name]
            donor = next((slot_of[i] for i in kernel.inputs if i in slot_of and i in planned
                          and spans[i][1] == index and slot_of[i].stop == index
                          and _reads_in_place(program, kernel, program.buffers[i], buffer,
                                              support)), None)
            if donor is not None:
                donor.names.append(name)
                donor.stop = stop
                reused += align(buffer.nbytes)
                slot_of[name] = donor
                continue
            slot = Slot([name], start, stop, align(buffer.nbytes))
            slots.append(slot)
            slot_of[name] = slot
    return slots, reused


def run(program: Program, ctx) -> dict:
    spans = lifetimes(program)
    frees: dict[int, list[str]] = {}
    escaping = program.escaping()
    for name, (start, stop) in spans.items():
        buffer = program.buffers.get(name)
        if name in escaping or name in program.constants:
            continue
        if buffer is None and name not in program.inputs:
            continue
        frees.setdefault(stop, []).append(name)
        if buffer is not None:
            buffer.first_use, buffer.last_use = start, stop
    program.frees = {index: sorted(names) for index, names in sorted(frees.items())}
    names = planned_buffers(program)
    slots, reused = _slots(program, spans, names, ctx.op_support)
    arena, strategy = plan_offsets(slots)
    for slot in slots:
        for name in slot.names:
            program.buffers[name].offset = slot.offset
    program.arena_bytes = arena
    temporaries = [b for b in program.buffers.values() if b.role == "temporary"]
    planned = set(names)
    return {
        "strategy": strategy,
        "temporaries": len(temporaries),
        "planned_buffers": len(names),
        "bytes_without_reuse": sum(align(program.buffers[n].nbytes) for n in names),
        "bytes_reused_in_place": reused,
        "arena_bytes": arena,
        "live_lower_bound_bytes": _live_peak((s.start, s.stop, s.size) for s in slots),
        "unplanned_bytes": sum(b.nbytes for b in temporaries if b.name not in planned
                               and b.name not in escaping),
    }
