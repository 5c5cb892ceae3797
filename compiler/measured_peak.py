"""A compiled program's measured peak, for the report's ``memory`` section.

retrograd runs a program while compiling only under ``verify=True`` (the
``codegen`` check runs it on the reference inputs); that run is the one it
measures, so a figure exists exactly where a real run happened, never a
guess. How: torch's own accounting of CPU allocations, the profiler's
``[memory]`` events (``profile_memory=True``), summed in time order
(allocations minus frees), the peak of that running sum -- the same rule as
``benchmarks/measuring.profiled_peak``, which the benchmarks' step peaks use.

What it counts: every torch allocation the program makes while it runs
(arenas, extern results, outputs, scratch of the aten kernels it calls, the
Triton interpreter's staging tensors), from the state before the call. The
inputs were allocated before it and the caller keeps them, so they are not
in the figure: the same scope as the memory timeline's ``held by the
program`` series, whose peak is the report's ``program_peak_bytes``.

A symbolic program (dynamic shapes) is not run while compiling; under
``verify=True`` its first call at the size hints, the sizes its
``program_peak_bytes`` is planned at, is measured by the same rule
(symbolic_peaks.py: ``HintProbe``, with a note naming those sizes).

Where it does not measure, ``bytes`` is None and ``note`` says why: no run
while compiling (``verify`` off), a device other than the CPU (the profiler's
CPU events do not see device memory), or a profiler already running (torch
allows one at a time). torch 2.13's profiler prints two ``USDT: ...
profiler_start/stop`` lines on stderr per measured run; they are its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["NOT_RUN", "Measured", "Probe"]

HOW = ("measured: peak of torch's CPU allocations minus frees (profiler memory events) "
       "while verify's codegen check ran the program once on the reference inputs")


@dataclass(frozen=True)
class Measured:
    """A measured peak in bytes (None where not measured) and how, or why not."""

    bytes: int | None
    note: str


NOT_RUN = Measured(None, "not measured: retrograd runs a program while compiling only "
                         "under verify=True, and measures that run")


def _devices(inputs: Sequence[Any]) -> set[str]:
    return {value.device.type for value in inputs if isinstance(value, torch.Tensor)}


def _peak(events) -> int:
    live = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events
                            if e.name() == "[memory]"):
        live += nbytes
        peak = max(peak, live)
    return peak


class Probe:
    """Stands in for a boxed executable: calls it once under the measurement
    and keeps the figure in ``measured`` (``NOT_RUN`` until called). Only the
    program's own call is inside the window, not what its caller does around
    it (verify's ``run_program`` copies the RNG state first). ``how``: the
    note of a measured figure."""

    def __init__(self, executable: Callable[[list], Any], inputs: Sequence[Any], how: str = HOW):
        self.executable, self.devices, self.measured = executable, _devices(inputs), NOT_RUN
        self.how = how   # the note of a measured figure: which run it measured

    def __call__(self, args: list):
        others = self.devices - {"cpu"}
        if others:
            self.measured = Measured(None, f"not measured: the program runs on "
                                           f"{', '.join(sorted(others))}; only CPU allocations "
                                           f"are measured (the profiler's CPU events)")
            return self.executable(args)
        if torch._C._autograd._profiler_enabled():
            self.measured = Measured(None, "not measured: a torch profiler was already running")
            return self.executable(args)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    profile_memory=True) as profiler:
            outputs = self.executable(args)
        self.measured = Measured(_peak(profiler.profiler.kineto_results.events()), self.how)
        return outputs
