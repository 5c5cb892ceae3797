"""Errors a user of the standalone face can meet, with the source line to fix.

The standalone face traces the whole call into one graph with static
shapes. Code whose control flow or output shape depends on tensor *values*
(``if loss > 0``, ``.item()``, ``x[x > 0]``, ``torch.nonzero``, mask helpers
that test ``mask.all()``) cannot be one such graph: the fake tensors of the
trace have no values. Torch raises its own exception from deep inside fake
tensor dispatch; ``data_dependent_error`` turns it into an
``UnsupportedError`` naming the op and the user's line, and points to
``torch.compile(..., backend="retrograd")``, where dynamo splits the graph at
such code.
"""

from __future__ import annotations

import functools
import os
import sys
import sysconfig
import traceback

import torch
from torch._subclasses.fake_tensor import (DataDependentOutputException,
                                           DynamicOutputShapeException)

__all__ = ["UnsupportedError", "DATA_DEPENDENT", "data_dependent_error",
           "data_dependent_reason", "user_frame",
           "user_stacklevel"]


class UnsupportedError(RuntimeError):
    """What retrograd cannot compile; the message names the op or option and
    the source line, and what to do instead."""


def _data_dependent_types() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [DataDependentOutputException,
                                         DynamicOutputShapeException]
    try:
        from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
        found.append(GuardOnDataDependentSymNode)
    except ImportError:   # pragma: no cover - older torch
        pass
    return tuple(found)


#: torch's exceptions for code that needs tensor values while tracing.
DATA_DEPENDENT = _data_dependent_types()

_WHY = {
    "aten._local_scalar_dense": "reads a tensor's value as a Python number (.item(), "
                                "bool(), int(), float(), or a tensor as an `if` condition)",
    "aten.nonzero": "has an output whose shape depends on tensor values (torch.nonzero, "
                    "boolean-mask indexing x[mask], masked_select)",
}


def _roots(packages) -> tuple[str, ...]:
    return tuple(os.path.join(os.path.realpath(folder), "") for package in packages
                 for folder in package.__path__)


@functools.cache
def _library_folders() -> tuple[tuple[str, ...], str, tuple[str, ...]]:
    """The folders of torch and retrograd's packages, the standard library and
    every site-packages (a venv's own, and the base interpreter's that a venv
    made with ``--system-site-packages`` also reads); found once, not for
    every frame a stack walk looks at."""
    import site
    import retrograd
    import retrograd.codegen
    import retrograd.passes
    import retrograd.runtime
    paths = sysconfig.get_paths()
    sites = {paths["purelib"], paths["platlib"], *getattr(site, "getsitepackages", list)()}
    base = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix})
    sites |= {base["purelib"], base["platlib"]}
    return (_roots((torch, retrograd, retrograd.passes, retrograd.codegen, retrograd.runtime)),
            os.path.join(os.path.realpath(paths["stdlib"]), ""),
            tuple(os.path.join(os.path.realpath(s), "") for s in sorted(sites)))


def _is_library(filename: str) -> bool:
    """Frames of torch, of retrograd's packages and of the standard library
    are not the user's; other site-packages (transformers) are."""
    if filename.startswith("<"):
        return True
    path = os.path.realpath(filename)
    ours, stdlib, site = _library_folders()
    if path.startswith(ours):
        return True
    return path.startswith(stdlib) and not path.startswith(site)


def user_frame(error: BaseException) -> traceback.FrameSummary | None:
    """The innermost frame of ``error``'s traceback in the user's code (or a
    library of theirs, such as transformers), or None."""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if not _is_library(frame.filename):
            return frame
    return None


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the user's call (the
    first frame of the caller's stack outside torch and retrograd)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and _is_library(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level


def _op_name(error: BaseException) -> str:
    func = getattr(error, "func", None)
    if func is not None:
        return str(func)
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def data_dependent_reason(error: BaseException, what: str) -> str:
    """``what: op at file:line (code) why``: what in the user's code needs
    tensor values, for the error and for the standalone face's fallback warning."""
    op = _op_name(error)
    why = next((text for prefix, text in _WHY.items() if op.startswith(prefix)),
               "depends on tensor values")
    frame = user_frame(error)
    where = (f" at {frame.filename}:{frame.lineno} ({frame.name}: {(frame.line or '').strip()})"
             if frame is not None else "")
    return f"{what}: {op}{where} {why}"


def data_dependent_error(error: BaseException, what: str) -> UnsupportedError:
    """An ``UnsupportedError`` for torch's data-dependent ``error`` in ``what``."""
    return UnsupportedError(
        f"{data_dependent_reason(error, what)}; the standalone face traces one graph with static "
        f"shapes and cannot follow it. Use torch.compile(..., backend=\"retrograd\"), which "
        f"splits the graph at such code, or compute the value outside the compiled call")
