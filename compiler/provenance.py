"""Which line of the user's code each traced node comes from.

AOTAutograd copies ``fx.traceback``'s current node meta (``stack_trace``
among it) onto every node it traces, but only while
``fx.traceback.preserve_node_meta()`` is on and something sets that meta:

- the torch.compile face hands it dynamo's GraphModule, whose nodes carry
  the user's stack; AOTAutograd runs such a module through an fx
  Interpreter (which sets the meta node by node) only when it is handed the
  GraphModule itself, not a wrapper around it (``capture._OutputsOwnMemory``),
  so ``run_recording`` does the same;
- the standalone face traces the user's module directly, where nothing sets
  it; ``run_recording`` then watches every torch call (a TorchFunctionMode)
  and sets the innermost frame outside torch and retrograd as the stack.

``source_of`` turns such a stack trace back into ``file:line``: the
innermost frame that is not torch's, retrograd's or the standard library's
(``errors._is_library``: transformers' frames count as the user's).
"""

from __future__ import annotations

import functools
import linecache
import re
import sys
import traceback

from retrograd.errors import _is_library
from torch import fx
from torch.fx import traceback as fx_traceback
from torch.overrides import TorchFunctionMode

__all__ = ["recording", "run_recording", "source_of"]

_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<name>\S+)')


@functools.lru_cache(maxsize=4096)
def _library(filename: str) -> bool:
    return _is_library(filename)


@functools.lru_cache(maxsize=4096)
def _frame_text(filename: str, line: int, name: str) -> str:
    text = linecache.getline(filename, line).strip()
    return "".join(traceback.format_list([traceback.FrameSummary(filename, line, name,
                                                                 line=text)]))


def _user_frame_text() -> str | None:
    """The innermost frame of the current stack in the user's code, formatted
    as Python's tracebacks (and fx's ``stack_trace``) write frames."""
    frame = sys._getframe(2)
    while frame is not None and _library(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None:
        return None
    return _frame_text(frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name)


class _UserLines(TorchFunctionMode):
    """Sets fx's current stack trace to the user's line before each torch call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        text = _user_frame_text()
        if text is not None:
            fx_traceback.set_stack_trace([text])
        return func(*args, **(kwargs or {}))


def run_recording(module, args):
    """``module(*args)`` such that the nodes AOTAutograd traces from it carry
    the user's source line in ``node.meta["stack_trace"]``."""
    with fx_traceback.preserve_node_meta():
        if isinstance(module, fx.GraphModule):
            return fx.Interpreter(module).run(*args)
        with _UserLines():
            return module(*args)


def recording(function):
    """``function`` such that a trace of it (``make_fx``, AOTAutograd) records
    the user's source line on each node, as ``run_recording`` does."""
    def traced(*args, **kwargs):
        with fx_traceback.preserve_node_meta(), _UserLines():
            return function(*args, **kwargs)
    return traced


def source_of(stack_trace: str | None) -> str | None:
    """``file:line`` of the innermost user frame in an fx stack trace, or None."""
    if not stack_trace:
        return None
    for match in reversed(list(_FRAME.finditer(stack_trace))):
        if not _library(match["file"]):
            return f"{match['file']}:{match['line']}"
    return None

