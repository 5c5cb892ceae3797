"""Buffer lifetimes and the memory plan: an arena per busy window of the schedule.

What it does: computes, over the kernel schedule, when every buffer is first
written and last read (a view extends its base's life), groups the *planned*
buffers into windows of the schedule that never overlap in time (busy
periods, cut further where the predicted footprint peaks: ``planning/windows.py``),
and places each window's buffers at offsets of that window's arena so that
buffers alive at the same time never overlap. Planned buffers are the
temporaries written by generated kernels and by extern calls that have an
``out=`` form (matrix products);
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
at its own index (so no program reads what another already overwrote). The
input may be read through a chain of reshapes between row-major buffers (a
matrix product's ``[rows, n]`` result read as ``[batch, tokens, n]``, as every
``nn.Linear`` on a 3-d activation is): element i is then at the same address.

The liveness lower bound is the largest sum of (aligned) planned bytes alive
at one kernel, computed from lifetimes alone (buffers chained in place count
once: they share one slot); no planner can beat it. Offsets are aligned to
``ALIGN`` bytes for vector loads.

Updates (``Program.updates``: a training step's new parameters and optimizer
state) are written over the input they replace where that is safe
(``_donations``), so a step holds one copy of the model, not two.

Requires: a scheduled Program (fusion, then schedule).
Ensures: every temporary has its lifetime, frees and an arena offset (or its
  own storage); no two buffers alive at once overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

from retrograd.ir import ArenaWindow, Buffer, Kernel, PassResult, Program
from retrograd.passes.op_classes import OUT_VARIANTS, RESHAPE_OPS
from retrograd.passes.planning import scatter_in_place, windows
from retrograd.passes.planning.lifetimes import lifetimes
from retrograd.passes.planning.lifetimes import live_peak as _live_peak

__all__ = [
    "ALIGN",
    "OUT_VARIANTS",
    "Slot",
    "lifetimes",
    "live_lower_bound",
    "overlapping",
    "plan_offsets",
    "run",
]

ALIGN = 16



def align(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


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
                    support, reductions: bool = False) -> bool:
    """Every read of ``source`` in ``kernel`` is at the index ``target`` is written.

    Pointwise kernels: each program reads an element and then writes it. With
    ``reductions``, also reduction kernels: each program owns whole rows, reads
    them in its loops and stores its outputs after them, so a value of the
    same shape read without indexing is only ever read by the program that
    overwrites it, before it does.
    """
    if kernel.kind != "triton" or target.name in kernel.scratch:
        return False   # partials are written while other programs read the inputs
    pointwise = not kernel.is_reduction and kernel.name.startswith("pointwise")
    reduction = reductions and kernel.is_reduction and kernel.name.startswith("reduction")
    if not (pointwise or reduction):
        return False
    if (source.shape, source.strides, source.dtype) != (target.shape, target.strides,
                                                        target.dtype):
        return False
    root = program.root(source.name)
    if any(program.root(name) == root and name != source.name for name in kernel.inputs):
        return False   # its storage is read through another name too, at other indices
    for node in kernel.nodes:
        for arg in node.all_input_nodes:
            if arg.name != source.name:
                continue
            if support.reads_by_index(node):
                return False
            if pointwise and tuple(node.meta["val"].shape) != source.shape:
                return False
    return True


def _contiguous(buffer: Buffer) -> bool:
    expected, step = [], 1
    for size in reversed(buffer.shape):
        expected.append(step)
        step *= size
    return all(size <= 1 or a == b for size, a, b in
               zip(buffer.shape, buffer.strides, reversed(expected)))


def _same_order_base(program: Program, name: str, producers) -> str:
    """The buffer whose memory ``name`` is, element for element in row-major
    order: ``name`` itself, or the base of a chain of reshapes (``RESHAPE_OPS``)
    between contiguous buffers -- a matrix product's ``[rows, n]`` result read
    as ``[batch, tokens, n]``. A kernel reading such a view at its own index
    reads the base at the same address it writes."""
    while True:
        kernel = producers.get(name)
        buffer = program.buffers.get(name)
        if kernel is None or kernel.kind != "view" or buffer is None \
                or len(kernel.nodes) != 1 or kernel.nodes[0].target not in RESHAPE_OPS \
                or len(kernel.inputs) != 1:
            return name
        base = program.buffers.get(kernel.inputs[0])
        if base is None or base.dtype != buffer.dtype or base.numel != buffer.numel \
                or not (_contiguous(base) and _contiguous(buffer)):
            return name
        name = base.name


def _donor(program: Program, kernel: Kernel, index: int, buffer: Buffer, spans, slot_of,
           producers, support) -> Slot | None:
    """The slot of an input (or of the base of a reshaped input) that dies at
    ``kernel`` and that ``buffer`` may be written over in place."""
    for name in kernel.inputs:
        base = _same_order_base(program, name, producers)
        if base not in slot_of or spans[base][1] != index or slot_of[base].stop != index:
            continue
        if base != name and not (_contiguous(buffer) and buffer.shape
                                 == program.buffers[name].shape):
            continue
        if _reads_in_place(program, kernel, program.buffers[name], buffer, support):
            return slot_of[base]
    return None


def _slots(program: Program, spans, names: list[str], support) -> list[Slot]:
    """One slot per planned buffer, chaining in-place reuse."""
    slot_of: dict[str, Slot] = {}
    slots: list[Slot] = []
    planned = set(names)
    producers = {name: kernel for kernel in program.kernels for name in kernel.outputs}
    for index, kernel in enumerate(program.kernels):
        for name in kernel.outputs:
            if name not in planned:
                continue
            buffer = program.buffers[name]
            start, stop = spans[name]
            donor = _donor(program, kernel, index, buffer, spans, slot_of, producers,
                           support)
            if donor is not None:
                donor.names.append(name)
                donor.stop = stop
                slot_of[name] = donor
                continue
            slot = Slot([name], start, stop, align(buffer.nbytes))
            slots.append(slot)
            slot_of[name] = slot
    return slots


def _windows(program: Program, spans, slots: list[Slot]):
    """Busy periods, then peak-driven cuts (``passes/planning/windows.py``)."""
    planned = {name for slot in slots for name in slot.names}
    base = windows.base_footprint(program, spans, planned)
    return windows.split_windows(
        base, windows.busy_periods(slots),
        lambda w: _live_peak((s.start, s.stop, s.size) for s in w.slots))


def footprint(program: Program, spans) -> tuple[list[int], list[int]]:
    """Arena bytes held at each kernel, and the whole footprint the window
    search predicted there (``passes/planning/windows.py``), for the dump's picture."""
    held = [0] * len(program.kernels)
    for window in program.arenas:
        windows.add_span(held, window.start, window.stop, window.nbytes)
    planned = {name for name, b in program.buffers.items() if b.offset is not None}
    base = windows.base_footprint(program, spans, planned)
    return held, [a + b for a, b in zip(held, base)]


def _frees(program: Program, spans) -> dict[int, list[str]]:
    """Values to drop after each kernel (escaping values and constants never)."""
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
    return {index: sorted(names) for index, names in sorted(frees.items())}


def _donations(program: Program, spans, support) -> dict[str, str]:
    """Updates (``Program.updates``) written over the input they replace.

    Safe when the new value comes from a generated kernel with the input's
    shape, strides and dtype, nothing reads the old value after that kernel,
    and that kernel reads it, if at all, only where it writes it (the in-place
    rule above, reduction kernels included). XLA calls this buffer donation.
    """
    producer = {name: (index, kernel) for index, kernel in enumerate(program.kernels)
                for name in kernel.outputs}
    escaping = program.escaping()
    outputs = [n for n in program.outputs if isinstance(n, str)]
    donated: dict[str, str] = {}
    for output, source in program.updates.items():
        new, old = program.buffers.get(output), program.buffers.get(source)
        if new is None or old is None or output not in producer or source in escaping \
                or new.role == "view" or outputs.count(output) != 1 \
                or source in donated.values() or source not in program.inputs:
            continue
        index, kernel = producer[output]
        if kernel.kind != "triton" or (new.shape, new.strides, new.dtype) != (
                old.shape, old.strides, old.dtype):
            continue
        last_read = spans[source][1]
        if last_read > index or last_read == index and not _reads_in_place(
                program, kernel, old, new, support, reductions=True):
            continue
        donated[output] = source
        spans[source] = (spans[source][0], index)   # kept until it is written over
    return donated


def _place_windows(program: Program, chosen, standalone) -> list[str]:
    """Offsets per arena window; standalone chains keep their in-place links.
    Returns the strategy each arena's plan used."""
    program.arenas = []
    strategies = []
    for index, window in enumerate(chosen):
        nbytes, strategy = plan_offsets(window.slots)
        program.arenas.append(ArenaWindow(window.start, window.stop, nbytes, strategy))
        strategies.append(strategy)
        for slot in window.slots:
            for name in slot.names:
                program.buffers[name].offset = slot.offset
                program.buffers[name].arena = index
    program.arena_bytes = max((w.nbytes for w in program.arenas), default=0)
    for slot in standalone:   # own storage, still written over in place along the chain
        for donor, name in zip(slot.names, slot.names[1:]):
            program.buffers[name].reuses = donor
    return strategies


def _stats(program: Program, slots, kept, standalone, strategies, donated) -> dict:
    planned = {name for slot in kept for name in slot.names}
    escaping = program.escaping()
    temporaries = [b for b in program.buffers.values() if b.role == "temporary"]
    return {
        "strategy": max(set(strategies), key=strategies.count) if strategies else "none",
        "arenas": len(program.arenas),
        "temporaries": len(temporaries),
        "planned_buffers": len(planned),
        "standalone_buffers": sum(len(slot.names) for slot in standalone),
        "bytes_without_reuse": sum(align(program.buffers[n].nbytes) for n in planned),
        "bytes_reused_in_place": sum(align(program.buffers[n].nbytes) for slot in slots
                                     for n in slot.names[1:]),
        "arena_bytes": program.arena_bytes,
        "arena_bytes_total": sum(w.nbytes for w in program.arenas),
        "live_lower_bound_bytes": _live_peak((s.start, s.stop, s.size) for s in kept),
        "unplanned_bytes": sum(b.nbytes for b in temporaries if b.name not in planned
                               and b.name not in escaping),
        "updates_in_place": len(donated),
        "updates_out_of_place": len(program.updates) - len(donated),
    }


def _add_scratch(program: Program, support) -> int:
    """Workspace codegen will use (a split reduction's partials, asked of
    ``support.reduction_scratch``) becomes outputs of the kernels that use it
    (``Kernel.scratch``): planned temporaries alive while the kernel runs.
    Triton's interpreter is assumed off the GPU, where nothing is split."""
    scratch_of = getattr(support, "reduction_scratch", None)
    added = 0
    for kernel in program.kernels if scratch_of is not None else []:
        value = next((n.meta.get("val") for n in kernel.nodes
                      if hasattr(n.meta.get("val"), "device")), None)
        if kernel.kind != "triton" or not kernel.is_reduction or value is None:
            continue
        for buffer in scratch_of(kernel, value.device.type != "cuda"):
            program.buffers[buffer.name] = buffer
            kernel.outputs.append(buffer.name)
            added += 1
    return added


def run(program: Program, ctx) -> PassResult:
    scratch = _add_scratch(program, ctx.op_support) if ctx.options.executor in (
        "auto", "triton", "interpret") else 0
    spans = lifetimes(program)
    donated = _donations(program, spans, ctx.op_support)
    scattered = scatter_in_place.donations(program, spans, set(planned_buffers(program)))
    for output, source in {**donated, **scattered}.items():
        program.buffers[output].reuses = source
    program.frees = _frees(program, spans)
    slots = _slots(program, spans, planned_buffers(program), ctx.op_support)
    chosen, standalone = _windows(program, spans, slots)
    strategies = _place_windows(program, chosen, standalone)
    kept = [slot for window in chosen for slot in window.slots]
    stats = _stats(program, slots, kept, standalone, strategies, donated)
    return PassResult(program, {**stats, "scatters_in_place": len(scattered),
                                "scratch_buffers": scratch})
