"""Where generated kernels run: compiled Triton on CUDA, or Triton's interpreter.

Triton reads ``TRITON_INTERPRET`` (through ``triton.knobs``, on every read)
when a kernel is decorated and again while an interpreted kernel runs
(constexpr helpers, lazy imports), not when triton is imported
(../shared/TRITON_ON_CPU.md). The loader sets it around loading a kernel
module and the executor around an interpreted program's run, through
``interpreter_mode``; a user never sets it.

Threads. ``os.environ`` is process-wide, and so is the interpreter's state:
one ``interpreter_builder`` holds the grid index that ``tl.program_id``
reads, and each launch patches ``triton.language`` functions in place and
restores them after. Two interpreted launches at once read each other's
program ids and unpatch each other's functions, and a CUDA kernel compiled
meanwhile would meet the patched functions. So ``interpreter_mode`` is a
gate (``_Gate``): with the interpreter on, one thread alone (interpreted
program runs and kernel loads go one at a time); with it off (CUDA loads
and launches), any number of threads at once, never beside an interpreted
run. A thread inside always sees its own setting, and the variable ends
exactly as it began (absent or its value), whatever order threads come and
go in. Lock order: the compile lock (``retrograd.locking``), then the gate.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, Sequence

import torch

__all__ = ["choose_executor", "interpreter_mode", "device_of"]


def device_of(tensors: Sequence[object]) -> torch.device:
    """The device of the first tensor argument not on the CPU, else CPU: a
    backward's first inputs may be activations offloaded to host memory."""
    for value in tensors:
        if isinstance(value, torch.Tensor) and value.device.type != "cpu":
            return value.device
    return torch.device("cpu")


#: What ``executor="auto"`` runs on a CPU: the torch program (fast; Triton's
#: interpreter is 30-180x slower than eager). tests/conftest.py sets
#: "interpret" so that the tests of generated kernels keep running them.
CPU_AUTO = "torch"


def choose_executor(requested: str, device: torch.device) -> str:
    """Resolve ``"auto"`` and refuse combinations that cannot work."""
    if requested == "auto":
        return "triton" if device.type == "cuda" else CPU_AUTO
    if requested == "triton" and device.type != "cuda":
        raise ValueError(
            f"retrograd: executor='triton' needs CUDA tensors, got tensors on {device}; "
            f"use executor='interpret' to run the kernels on the CPU (or 'auto': "
            f"torch calls there)")
    if requested == "interpret" and device.type != "cpu":
        raise ValueError(
            f"retrograd: executor='interpret' runs on CPU tensors, got tensors on {device}")
    return requested


def _set_environment(value: str | None) -> None:
    if value is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = value


class _Gate:
    """Who may use Triton now: one thread with the interpreter on, or any number
    with it off (CUDA loads and launches), never both.

    The interpreter's state is global, so interpreted runs go one at a time;
    CUDA launches from several threads (one per GPU, say) stay concurrent,
    but never overlap an interpreted run, whose patched ``triton.language``
    would reach a CUDA kernel compiled meanwhile. The first holder saves
    TRITON_INTERPRET and the last one out restores it; the interpreter's
    holder may nest entries of either mode (each restores what it found).
    """

    def __init__(self):
        self.condition = threading.Condition(threading.Lock())
        self.owner: int | None = None        # the thread with the interpreter on
        self.shared: dict[int, int] = {}     # thread -> depth, interpreter off
        self.waiting = 0                     # threads waiting to turn it on
        self.saved: str | None = None        # TRITON_INTERPRET before the first holder

    def enter(self, enabled: bool) -> str | None:
        """Wait for our turn and set the variable; returns what an exit restores
        for a nested entry of the owner (None otherwise)."""
        me = threading.get_ident()
        with self.condition:
            if self.owner == me:
                previous = os.environ.get("TRITON_INTERPRET")
                _set_environment("1" if enabled else "0")
                return previous
            if enabled:
                if me in self.shared:
                    raise RuntimeError("retrograd: an interpreted run was started inside a "
                                       "CUDA load or launch of the same thread")
                self.waiting += 1
                try:
                    self.condition.wait_for(lambda: self.owner is None and not self.shared)
                finally:
                    self.waiting -= 1
                self.owner, self.saved = me, os.environ.get("TRITON_INTERPRET")
                _set_environment("1")
                return None
            if me not in self.shared:
                self.condition.wait_for(lambda: self.owner is None and not self.waiting)
            if not self.shared:
                self.saved = os.environ.get("TRITON_INTERPRET")
                _set_environment("0")
            self.shared[me] = self.shared.get(me, 0) + 1
            return None

    def leave(self, nested: bool, previous: str | None) -> None:
        me = threading.get_ident()
        with self.condition:
            if nested:
                _set_environment(previous)
                return
            if self.owner == me:
                self.owner = None
            else:
                self.shared[me] -= 1
                if self.shared[me] == 0:
                    del self.shared[me]
            if self.owner is None and not self.shared:
                _set_environment(self.saved)
                self.condition.notify_all()


_GATE = _Gate()


@contextlib.contextmanager
def interpreter_mode(enabled: bool) -> Iterator[None]:
    """Set TRITON_INTERPRET for the block (kernels decorated or launched there):
    on, this thread alone; off, shared with other threads that have it off.
    The variable ends as it was before the first holder (absent or its value)."""
    nested = _GATE.owner == threading.get_ident()
    previous = _GATE.enter(enabled)
    try:
        yield
    finally:
        _GATE.leave(nested, previous)
