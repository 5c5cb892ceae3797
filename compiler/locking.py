"""One process-wide lock around every trace and compile (issue 11, threads).

Tracing is not thread-safe in torch: ``make_fx`` keeps its patcher in a
module global (``torch.fx._symbolic_trace.CURRENT_PATCHER``), AOTAutograd and
fx keep node-metadata state in globals, and ``decompositions.traced_right``
swaps op kernels on the op objects themselves. Two threads tracing at once
crashed inside torch ("CURRENT_PATCHER is None") and left that state broken
for every later ``torch.compile`` in the process. So every trace and compile
-- ``capture.compile_graph`` (both faces), AOTAutograd's lazily compiled
backward, ``capture.joint_graph``, ``compile_step``'s traces and pipeline --
runs under ``compiling()``, one thread at a time.

The lock is re-entrant (a compile nests: verify runs programs, a trace can
reach code that compiles). It also holds dynamo's own compile lock, taken
first, so a retrograd trace never overlaps a ``torch.compile`` that another
thread is compiling with any backend (dynamo traces with the same globals).
Lock order is always dynamo's, then ours, then the interpreter's
(``runtime/device.py``); nothing takes them in another order.

Running compiled programs does not take this lock; see
``runtime/device.py`` for interpreted launches.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

__all__ = ["compiling"]

_LOCK = threading.RLock()


def _dynamo_lock():
    """Dynamo's compile lock (a re-entrant lock), or a no-op where this torch lacks it."""
    try:
        from torch._dynamo.convert_frame import compile_lock
    except ImportError:   # pragma: no cover - another torch
        return contextlib.nullcontext()
    return compile_lock if hasattr(compile_lock, "acquire") else contextlib.nullcontext()


@contextlib.contextmanager
def compiling() -> Iterator[None]:
    """Hold the process-wide compile lock for the block (re-entrant).

    Example:
        >>> with compiling():
        ...     traced = make_fx(function)(*inputs)
    """
    with _dynamo_lock(), _LOCK:
        yield

