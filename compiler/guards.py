"""Guards on the Python state a standalone trace baked in.

A trace turns every Python value the code reads into a constant: a module's
``self.temperature``, a ``self.use_mask`` flag, a float the function closes
over, a global, a tensor constant. Dynamo guards on what it read; the
standalone face does the same for what it can see without bytecode analysis:

- **module attributes**: while tracing, ``nn.Module.__getattribute__`` is
  wrapped to record every plain attribute read (``__dict__`` and class
  attributes; parameters, buffers and submodules are inputs, keyed apart);
- **what a function reads by name** (``reach.references``): closure cells,
  default arguments, the globals its code names, attributes of plain objects
  it names (``cfg.temperature``), following helper functions of the user's
  code for two steps. For a module, the ``forward`` of each class in it.

Guarded values: numbers (numpy scalars too), strings, bools, None, dtypes,
devices, enums, tuples/lists/dicts of them and small numpy arrays (by value),
and tensors (by identity and version counter: an in-place change to a
constant traces again). Other values
(a config object read inside a module) are not guarded; docs/design.md says so.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import numbers
import threading
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy
import torch

from retrograd.errors import UnsupportedError, user_stacklevel
from retrograd.locking import compiling
from retrograd.reach import (MISSING, Reference, attribute_names, is_plain_object,
                             library_function, references)

__all__ = ["Guards", "frozen", "function_guards", "recording_module_reads"]

_SIMPLE = (numbers.Number, str, bytes, type(None), torch.dtype, torch.device, enum.Enum)

#: Containers and arrays up to this many items are guarded by value.
_MAX_ITEMS = 1024

#: nn.Module's own bookkeeping (hooks, parameter dicts, train flag): keyed elsewhere.
_MODULE_INTERNALS = frozenset(vars(torch.nn.Module())) | frozenset(dir(torch.nn.Module))


def frozen(value: Any, depth: int = 0):
    """A comparable snapshot of ``value``, or None where no guard can be built.

    The type is part of it (``1``, ``1.0`` and ``True`` trace alike but are
    different values); tensors are snapshot by identity and version counter.
    """
    if isinstance(value, _SIMPLE) or value is MISSING:
        return (type(value), value)
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value), value._version)
    if isinstance(value, numpy.ndarray):
        return (("ndarray", value.dtype.str, value.shape, value.tobytes())
                if value.size <= _MAX_ITEMS else None)
    if depth >= 3:
        return None
    if isinstance(value, (tuple, list)) and len(value) <= _MAX_ITEMS:
        parts = tuple(frozen(item, depth + 1) for item in value)
        return None if None in parts else (type(value), parts)
    if isinstance(value, dict) and len(value) <= _MAX_ITEMS:
        parts = tuple((frozen(k, depth + 1), frozen(v, depth + 1)) for k, v in value.items())
        return None if any(None in part for part in parts) else (type(value), parts)
    return None


def too_large(value: Any) -> bool:
    """Data no guard can hold by value: a numpy array, list, tuple or dict of
    more than ``_MAX_ITEMS`` numbers or strings (containers of modules or
    objects are not data, and are not guarded)."""
    if isinstance(value, numpy.ndarray):
        return value.size > _MAX_ITEMS
    items = list(value.values()) if isinstance(value, dict) else value
    return (isinstance(value, (list, tuple, dict)) and len(items) > _MAX_ITEMS
            and all(isinstance(item, _SIMPLE) for item in items))


def _refuse(label: str) -> UnsupportedError:
    return UnsupportedError(
        f"retrograd: the trace reads {label}, a container or array of more than "
        f"{_MAX_ITEMS} values; the standalone face cannot guard it by value, so a change "
        f"would be silently ignored. Make it a tensor (a buffer or an argument), or use "
        f"torch.compile(..., backend=\"retrograd\")")


class _Guard:
    """One guarded value: its label, how to read it, its snapshot (``frozen``)."""

    __slots__ = ("_simple", "_value", "get", "label")

    def __init__(self, label: str, get: Callable[[], Any], value: Any):
        self.label, self.get = label, get
        self.value = value

    @property
    def value(self) -> Any:
        return self._value

    @value.setter
    def value(self, value: Any) -> None:
        self._value = value
        # the type of a number, string or other simple value (snapshot ``(type,
        # value)``), found once so that ``holds`` compares it without a snapshot
        kind = value[0] if type(value) is tuple and len(value) == 2 else None
        self._simple = kind if isinstance(kind, type) and issubclass(kind, _SIMPLE) else None

    def holds(self) -> bool:
        """Whether the value reads as it was traced. A simple value is compared
        without building its snapshot again: the same type and an equal value
        is exactly when ``frozen`` of it compares equal (a tuple compares each
        item by identity, then ``==``); anything else compares snapshots."""
        try:   # _read, inlined: this runs for every guard on every call
            now = self.get()
        except Exception:   # noqa: BLE001 - a value that no longer reads is a changed value
            now = MISSING
        if type(now) is self._simple:
            expected = self._value[1]
            if now is expected or now == expected:
                return True
        return frozen(now) == self._value


@dataclass
class Guards:
    """The Python values one compiled graph was traced with."""

    items: list[_Guard] = field(default_factory=list)

    def add(self, label: str, get: Callable[[], Any]) -> None:
        """Guard ``get()``'s value as it is now; refuses data too large to guard."""
        current = _read(get)
        value = frozen(current)
        if value is not None:
            self.items.append(_Guard(label, get, value))
        elif too_large(current):
            raise _refuse(label)

    def failing(self) -> str | None:
        """The label of the first value that changed since the trace, or None."""
        for guard in self.items:
            if not guard.holds():
                return guard.label
        return None

    def refresh(self, what: str) -> None:
        """Take the values as they are after the trace; warn for the ones the
        trace itself changed (a compiled graph does not replay Python side effects)."""
        for guard in self.items:
            now = frozen(_read(guard.get))
            if now != guard.value:
                warnings.warn(f"{what} changed {guard.label} while it was "
                              f"traced; the compiled graph does not run Python side effects "
                              f"again. torch.compile(..., backend=\"retrograd\") replays them",
                              stacklevel=user_stacklevel())
                guard.value = now
        self.items = [guard for guard in self.items if guard.value is not None]


def _read(get: Callable[[], Any]) -> Any:
    try:
        return get()
    except Exception:   # noqa: BLE001 - a value that no longer reads is a changed value
        return MISSING


def function_guards(function: Callable, guards: Guards, depth: int = 2,
                    seen: set | None = None) -> None:
    """Add guards on what ``function`` reads by name (see the module docstring)."""
    seen = set() if seen is None else seen
    code = getattr(getattr(function, "__func__", function), "__code__", function)
    if id(code) in seen or depth < 0:
        return
    seen.add(id(code))
    names = attribute_names(function)
    for reference in references(function):
        value = _read(reference.get)
        if isinstance(value, (types.FunctionType, functools.partial)):
            if not library_function(value):
                function_guards(value, guards, depth - 1, seen)
        elif is_plain_object(value) and not isinstance(value, types.MethodType):
            _object_guards(reference, value, names, guards)
        else:
            guards.add(reference.label, reference.get)


def _object_guards(reference: Reference, value: Any, names: set[str], guards: Guards) -> None:
    """Guard the attributes of a plain object that the code names (``cfg.scale``)."""
    for name in sorted(names & set(vars(value))):
        guards.add(f"attribute {name!r} of {reference.label}",
                   lambda get=reference.get, name=name: getattr(get(), name))


def module_function_guards(modules: list[torch.nn.Module], guards: Guards) -> None:
    """Guards on the globals read by the ``forward`` of each class in ``modules``."""
    seen: set = set()
    classes = {type(sub) for module in modules for sub in module.modules()}
    for cls in sorted(classes, key=lambda c: c.__qualname__):
        forward = getattr(cls, "forward", None)
        if isinstance(forward, types.FunctionType) and not library_function(forward):
            function_guards(forward, guards, depth=1, seen=seen)


# -- recording the module attributes a trace reads ------------------------------------------

#: thread id -> that thread's open recordings (innermost last); a trace in one
#: thread never records (or misses) reads made in another
_recorders: dict[int, list[dict]] = {}
_TOO_LARGE = object()
_lock = threading.Lock()


def _recording_getattribute(self, name):
    value = object.__getattribute__(self, name)
    stack = _recorders.get(threading.get_ident()) if _recorders else None
    if stack and name not in _MODULE_INTERNALS and not name.startswith("__"):
        reads = stack[-1]
        if (id(self), name) not in reads and not getattr(type(self), "_retrograd_internal",
                                                         False):
            snapshot = frozen(value)   # as the trace saw it
            reads[(id(self), name)] = (self, name, _TOO_LARGE if snapshot is None
                                       and too_large(value) else snapshot)
    return value


@contextlib.contextmanager
def recording_module_reads() -> Iterator[dict]:
    """Record ``(module, name)`` of each plain attribute a module reads inside
    the block: ``nn.Module.__getattribute__`` is wrapped for its duration (the
    class attribute is removed again on exit, so eager code pays nothing).
    The block holds the compile lock (locking.py), so the wrapper never
    exists while dynamo traces in another thread (it would trace it)."""
    reads: dict = {}
    thread = threading.get_ident()
    with compiling():
        with _lock:
            if not _recorders:
                torch.nn.Module.__getattribute__ = _recording_getattribute
            _recorders.setdefault(thread, []).append(reads)
        try:
            yield reads
        finally:
            with _lock:
                stack = _recorders[thread]
                stack.pop()   # this block's own: blocks nest within a thread
                if not stack:
                    del _recorders[thread]
                if not _recorders:
                    del torch.nn.Module.__getattribute__


def module_read_guards(reads: dict, names: dict[int, str], guards: Guards) -> None:
    """Guards on the recorded reads, with the values the trace read (``refresh``
    then warns where the trace itself changed one); ``names`` maps id(module)
    to a label for the user's modules: the modules torch builds while tracing
    (graphs, holders of tensor constants) are not guarded."""
    for module, name, value in reads.values():
        if value is _TOO_LARGE and id(module) in names:
            raise _refuse(f"attribute {names[id(module)]}.{name}")
        if value is not None and id(module) in names:
            guards.items.append(_Guard(f"attribute {names[id(module)]}.{name}",
                                       lambda module=module, name=name: getattr(module, name),
                                       value))
