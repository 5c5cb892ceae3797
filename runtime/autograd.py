"""Glue between executables and AOTAutograd's autograd.Function.

AOTAutograd wraps the compiled forward and backward in its own
``autograd.Function``; what it needs from us is the boxed calling
convention (one list argument, which the callee may clear so that saved
tensors die as early as possible).
"""

from __future__ import annotations

from typing import Callable

__all__ = ["boxed"]


def boxed(executable: Callable[[list], list]) -> Callable[[list], list]:
    """Mark ``executable`` as taking its arguments as one list."""
    executable._boxed_call = True
    return executable
