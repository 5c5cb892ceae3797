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
program ids and unpatch each other's functions. So ``interpreter_mode``
holds one process-wide re-entrant lock for as long as it lasts: interpreted
program runs and kernel loads go one at a time, a thread inside always sees
its own setting, and the variable ends exactly as it began (absent or its
value), whatever order threads come and go in. Compiled CUDA launches do not
take it. Lock order: the compile lock (``retrograd.locking``), then this one.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, Sequence

import torch

__all__ = ["choose_executor", "interpreter_mode", "device_of"]


def device_of(tensors: Sequence[object]) -> torch.device:
    """The device of the first tensor argument (CPU when there is none)."""
    for value in tensors:
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def choose_executor(requested: str, device: torch.device) -> str:
    """Resolve ``"auto"`` and refuse combinations that cannot work."""
    if requested == "auto":
        return "triton" if device.type == "cuda" else "interpret"
    if requested == "triton" and device.type != "cuda":
        raise ValueError(
            f"retrograd: executor='triton' needs CUDA tensors, got tensors on {device}; "
            f"use executor='interpret' (or 'auto') to run the kernels on the CPU")
    if requested == "interpret" and device.type != "cpu":
        raise ValueError(
            f"retrograd: executor='interpret' runs on CPU tensors, got tensors on {device}")
    return requested


#: Held while TRITON_INTERPRET is ours: interpreted runs and kernel loads (see above).
_INTERPRETER_LOCK = threading.RLock()


@contextlib.contextmanager
def interpreter_mode(enabled: bool) -> Iterator[None]:
    """Set TRITON_INTERPRET for the block (kernels decorated or run there), holding
    the interpreter lock; the previous value (or its absence) is restored."""
    with _INTERPRETER_LOCK:
        previous = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if enabled else "0"
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = previous
