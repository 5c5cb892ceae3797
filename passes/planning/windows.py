"""Arena windows: which stretch of the schedule each arena covers.

An arena is held whole from the first kernel that writes one of its buffers
to the last that reads one. A single arena for a whole program therefore sits
beside everything the program allocates outside it -- gradients and saved
activations as they are produced, extern results, the scratch space of
extern calls -- even at kernels where most of its bytes are free. Eager
PyTorch frees every temporary at its last use and does not pay that.

So buffer_reuse gives a program one arena per *window*: windows never overlap
in time, each holds the slots whose lifetimes fall inside it, and a slot
alive across a window boundary becomes a standalone allocation (torch's
allocator, freed at its last use, counted in ``unplanned_bytes``; buffers
chained in place along it still share that one allocation).

1. Busy periods first: the schedule splits wherever no planned slot is alive
   across two neighbouring kernels. Such a cut costs nothing -- no slot
   changes place -- and is the "busy period" of a heap simulator (XLA's heap
   simulator plans each one on its own as well).
2. Then peak-driven splits: the footprint model below predicts the bytes the
   program holds at every kernel; while the largest prediction falls in a
   window that holds more bytes there than its slots use, the window is cut
   at the point that lowers the predicted peak most -- or one slot alive
   where the window's slots hold the most is moved out to an allocation of
   its own, where no cut lowers the peak as much (an arena sized by the
   backward's fullest point and held from the forward's start: a cut there
   makes every slot alive across it standalone) -- and the search stops
   when no move lowers it (Pisarchyk & Lee's planners make the same kind
   of choice with a memory-usage objective rather than a count of arenas).

The footprint model: at kernel ``t``, the arenas held, plus every storage of
the program's own that is alive (extern and standalone results, escaping
outputs from their birth on; a buffer written in place over another, or a
``wait_tensor``'s result, extends that storage's life: ``storage_lives``;
inputs are left out: the caller holds most of them,
parameters and the batch, anyway), plus, at a
convolution (``SCRATCH_OPS``), scratch as large as the bytes the call reads
and writes -- torch allocates workspace there that the plan cannot see
(oneDNN does on CPU, cuDNN on GPU), and the estimate keeps arenas small
around such calls. Matrix products allocate nothing but their result. It is a
prediction for choosing windows, not a measurement; ``benchmarks/memory.py``
measures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from retrograd.ir import Program
from retrograd.passes.op_classes import SCRATCH_OPS
from retrograd.passes.planning.lifetimes import storage_owners

__all__ = [
    "Window",
    "add_span",
    "base_footprint",
    "busy_periods",
    "split_windows",
    "storage_lives",
]


@dataclass
class Window:
    """The slots one arena holds (``Slot`` objects of buffer_reuse)."""

    slots: list = field(default_factory=list)

    @property
    def start(self) -> int:
        return min(slot.start for slot in self.slots)

    @property
    def stop(self) -> int:
        return max(slot.stop for slot in self.slots)


def busy_periods(slots: list) -> list[Window]:
    """Maximal stretches of the schedule in which some slot is always alive."""
    windows: list[Window] = []
    stop = None
    for slot in sorted(slots, key=lambda s: (s.start, s.stop)):
        if windows and slot.start <= stop:
            windows[-1].slots.append(slot)
            stop = max(stop, slot.stop)
        else:
            windows.append(Window([slot]))
            stop = slot.stop
    return windows


def storage_lives(program: Program, spans: dict[str, tuple[int, int]],
                  planned: set[str]) -> dict[str, tuple[int, int]]:
    """(first, last) kernel per storage outside the arenas, by the buffer that
    owns it. A buffer written in place over another (``Buffer.reuses``), or
    returning another's storage (``lifetimes.storage_owners``: a
    ``wait_tensor``'s result is its collective's tensor), allocates nothing
    and extends the life of that storage; views, constants and program
    inputs (the caller's) are left out."""
    lives: dict[str, tuple[int, int]] = {}
    owners = storage_owners(program)
    for name, buffer in program.buffers.items():
        if name in planned or buffer.role == "view" or name in program.constants \
                or name not in spans:
            continue
        root = owners.get(name, name)
        while program.buffers[root].reuses is not None:
            root = program.buffers[root].reuses
        start, stop = spans[name]
        first, last = lives.get(root, (start, stop))
        lives[root] = (min(first, start), max(last, stop))
    return {root: life for root, life in lives.items() if program.buffers[root].role != "input"}


def _storages(program: Program, spans: dict[str, tuple[int, int]], planned: set[str]):
    """(bytes, first, last) per storage outside the arenas (``storage_lives``)."""
    return [(program.buffers[root].nbytes, first, last)
            for root, (first, last) in storage_lives(program, spans, planned).items()]


def base_footprint(program: Program, spans: dict[str, tuple[int, int]],
                   planned: set[str]) -> list[int]:
    """Predicted bytes held at each kernel outside the arenas (module docstring)."""
    held = [0] * len(program.kernels)
    for nbytes, start, stop in _storages(program, spans, planned):
        add_span(held, start, stop, nbytes)
    for index, kernel in enumerate(program.kernels):
        if kernel.kind == "extern" and any(op in kernel.op for op in SCRATCH_OPS):
            held[index] += sum(program.buffers[n].nbytes for n in kernel.inputs + kernel.outputs
                               if n in program.buffers)
    return held


def add_span(profile: list[int], start: int, stop: int, nbytes: int) -> None:
    """Add ``nbytes`` at kernels ``start..stop`` (clipped to the schedule)."""
    for index in range(max(start, 0), min(stop, len(profile) - 1) + 1):
        profile[index] += nbytes


def _profile(base: list[int], windows: list[Window], standalone: list, size) -> list[int]:
    """Footprint with ``windows`` as arenas (each ``size(window)`` bytes) and
    ``standalone`` slots allocated on their own (a chain of in-place writes
    keeps one allocation)."""
    profile = list(base)
    for window in windows:
        add_span(profile, window.start, window.stop, size(window))
    for slot in standalone:
        add_span(profile, slot.start, slot.stop, slot.size)
    return profile


def _cuts(window: Window) -> list[int]:
    """Kernel indices a window can be cut before (both sides keep a slot)."""
    starts = sorted({slot.start for slot in window.slots})
    return [index for index in starts if index > window.start]


def _split(window: Window, cut: int) -> tuple[list[Window], list]:
    """The windows left and right of ``cut`` and the slots alive across it."""
    left = [s for s in window.slots if s.stop < cut]
    right = [s for s in window.slots if s.start >= cut]
    crossing = [s for s in window.slots if s.start < cut <= s.stop]
    return [Window(part) for part in (left, right) if part], crossing


def _fullest(window: Window) -> list:
    """The slots alive where the window's slots hold the most bytes at once
    (the point that sizes its arena)."""
    held: dict[int, int] = {}
    for slot in window.slots:
        for index in range(slot.start, slot.stop + 1):
            held[index] = held.get(index, 0) + slot.size
    top = max(held, key=lambda index: (held[index], -index))
    return [slot for slot in window.slots if slot.start <= top <= slot.stop]


def _moves(window: Window):
    """(windows replacing ``window``, slots made standalone): each cut, and
    each eviction of one slot alive where the arena is fullest (it gets an
    allocation of its own, alive only over its life, and the arena shrinks
    over the whole window: a long-lived slot, a gathered FSDP2 weight kept
    for the backward, sized an arena held from the forward's start)."""
    for cut in _cuts(window):
        yield _split(window, cut)
    for slot in _fullest(window) if len(window.slots) > 1 else []:
        yield [Window([s for s in window.slots if s is not slot])], [slot]


def split_windows(base: list[int], windows: list[Window], size,
                  limit: int = 64) -> tuple[list[Window], list]:
    """Cut windows, or move a slot out of one, while that lowers the
    predicted peak (module docstring).

    ``size(window)`` estimates a window's arena bytes (the liveness lower
    bound of its slots). Returns the windows and the slots made standalone.
    """
    standalone: list = []
    for _ in range(limit):
        profile = _profile(base, windows, standalone, size)
        if not profile:
            break
        peak = max(profile)
        at = profile.index(peak)
        window = next((w for w in windows if w.start <= at <= w.stop), None)
        if window is None:
            break
        best = None
        for parts, moved in _moves(window):
            trial = [w for w in windows if w is not window] + parts
            trial_peak = max(_profile(base, trial, standalone + moved, size))
            if trial_peak < peak and (best is None or trial_peak < best[0]):
                best = (trial_peak, trial, moved)
        if best is None:
            break
        _, windows, moved = best
        standalone += moved
    return sorted(windows, key=lambda w: w.start), standalone
