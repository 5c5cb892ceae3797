"""The arena window search (passes/planning/windows.py): besides cutting a
window, it may move one slot out of it (its own allocation), where no cut
can lower the predicted peak."""

from __future__ import annotations

from types import SimpleNamespace

from retrograd.passes.planning import windows
from retrograd.passes.planning.lifetimes import live_peak


def _size(window) -> int:
    return live_peak((slot.start, slot.stop, slot.size) for slot in window.slots)


def _peak(base, chosen, standalone) -> int:
    profile = list(base)
    for window in chosen:
        windows.add_span(profile, window.start, window.stop, _size(window))
    for slot in standalone:
        windows.add_span(profile, slot.start, slot.stop, slot.size)
    return max(profile)


def test_a_slot_moves_out_where_no_cut_lowers_the_peak():
    """Two slots written at kernel 2, one read to 4, one to 7; 50 bytes held
    outside the arena at 5. One arena of both is 20 bytes over 2..7 (70 at
    5) and cannot be cut (both slots start at its first kernel). The short
    slot on its own: 10 bytes over 2..4, the arena 10 (60 at 5). The search
    stopped at 70 before."""
    short = SimpleNamespace(start=2, stop=4, size=10)
    long = SimpleNamespace(start=2, stop=7, size=10)
    base = [0, 0, 0, 0, 0, 50, 0, 0]
    found = windows.busy_periods([short, long])
    assert len(found) == 1 and _peak(base, found, []) == 70
    chosen, standalone = windows.split_windows(base, found, _size)
    assert standalone == [short], standalone
    assert [window.slots for window in chosen] == [[long]]
    assert _peak(base, chosen, standalone) == 60


def test_moving_a_slot_out_never_raises_the_peak():
    """Where the arena's fullest point is also the peak, a slot moved out
    would be held there as well: nothing moves."""
    first = SimpleNamespace(start=0, stop=3, size=10)
    second = SimpleNamespace(start=0, stop=3, size=10)
    base = [5, 5, 5, 5]
    chosen, standalone = windows.split_windows(base, windows.busy_periods([first, second]),
                                               _size)
    assert standalone == [] and len(chosen) == 1
    assert _peak(base, chosen, standalone) == 25
