"""A bounded number of compiled programs per compiled object, and why it grew.

Each new signature (shapes, dtypes, Python values; ``capture.signature``)
compiles a new program that holds its kernels, arenas and reports. Without
a bound a loop over ever-new shapes grows memory forever. Like dynamo's
``torch._dynamo.config.recompile_limit`` (8 per frame, then eager for that
frame with a warning), each compiled object keeps at most
``Options.max_programs``; past it the least recently used program is
released (it compiles again if called), with one warning per object that
names what changed between the new signature and the nearest kept one
("input 0 shape (4, 8) -> (5, 8)") and what to do about it.

Sizes that vary do not compile a program each: after a dimension's second
size, one program with it symbolic serves the others (dynamic.py). What
still compiles again is logged with what changed, and
``Options.recompile_limit`` caps the compiles of a compiled object: past
it, a call that would compile runs in eager PyTorch instead, with one
warning (``recompile_limit_message``), as dynamo does past its own
``recompile_limit``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from typing import Any

from retrograd.errors import user_stacklevel

__all__ = ["ProgramBound", "describe_change", "limit_message", "recompile_limit_message"]

log = logging.getLogger("retrograd")

#: The fields of a tensor's entry in ``capture.signature``, after its tag.
_TENSOR_FIELDS = ("shape", "stride", "dtype", "device", "requires_grad")

#: What the module-state parts of the standalone face's key mean (trace_cache.py).
_MODULE_PARTS = {"call": "the structure of the arguments (nesting, keyword names)",
                 "lifted": "the modules the function reaches",
                 "modules": "the submodules of the module",
                 "training": "train/eval mode of a submodule",
                 "hooks": "the hooks of a submodule",
                 "requires_grad": "requires_grad of a parameter",
                 "state": "a parameter or buffer (replaced, reshaped or converted)"}


def _describe_entry(position: int, old: Any, new: Any) -> list[str]:
    """What differs between two entries at the same place of two keys."""
    if old == new:
        return []
    tag_old = old[0] if isinstance(old, tuple) and old else None
    tag_new = new[0] if isinstance(new, tuple) and new else None
    if tag_old == tag_new == "tensor":
        return [f"input {position} {name} {_show(a)} -> {_show(b)}"
                for name, a, b in zip(_TENSOR_FIELDS, old[1:], new[1:]) if a != b]
    if tag_old == tag_new and tag_old in ("value", "int"):
        return [f"input {position} value {old[-1]!r} -> {new[-1]!r}"]
    if tag_old == tag_new == "grad":
        return [f"grad mode {old[1]} -> {new[1]}"]
    if tag_old == tag_new and tag_old in _MODULE_PARTS:
        return [f"{_MODULE_PARTS[tag_old]} changed"]
    if isinstance(tag_old, int) and tag_old == tag_new:   # the torch.compile face's scalars
        return [f"scalar input {tag_old} value {old[1]!r} -> {new[1]!r}"]
    return [f"{_show(old)} -> {_show(new)}"]


def _show(value: Any) -> str:
    """A key part as a user reads it (``torch.float32``, ``(4, 8)``)."""
    return str(value)


def _differences(old: tuple, new: tuple) -> list[str]:
    """Every difference between two signature keys, in key order."""
    found = []
    for position, (a, b) in enumerate(zip(old, new)):
        found += _describe_entry(position, a, b)
    if len(old) != len(new):
        extra_old, extra_new = old[len(new):], new[len(old):]
        found.append(f"the call's signature {len(old)} -> {len(new)} entries "
                     f"({', '.join(map(_show, extra_old or extra_new))} "
                     f"{'gone' if extra_old else 'new'})")
    return found


def describe_change(new: tuple, kept: Iterable[tuple], most: int = 3) -> str:
    """What changed from the nearest of the ``kept`` signature keys to ``new``:
    the one with the fewest differences, the latest of ``kept`` on a tie
    (``kept`` runs from least to most recently used).

    Example:
        >>> old = (("tensor", (4, 8), (8, 1), "float32", "cpu", True), ("grad", True))
        >>> new = (("tensor", (5, 8), (8, 1), "float32", "cpu", True), ("grad", True))
        >>> describe_change(new, [old])
        'input 0 shape (4, 8) -> (5, 8)'
    """
    candidates = [_differences(old, new) for old in kept if old != new]
    if not candidates:
        return "the same signature (a Python value the code reads changed)"
    nearest = min(reversed(candidates), key=len)
    shown = "; ".join(nearest[:most])
    return shown + (f" (and {len(nearest) - most} more)" if len(nearest) > most else "")


def limit_message(face: str, what: str, limit: int, change: str) -> str:
    """The one warning a compiled object gives when it passes ``max_programs``."""
    return (f"{face}: {what} has been compiled for more than {limit} signatures "
            f"(option max_programs={limit}); the least recently used program is released "
            f"and compiles again if called. The last new signature differs from the nearest "
            f"kept one in: {change}. Sizes that vary compile one symbolic program after "
            f"their second value (dynamic=None); other changes (dtypes, layouts, Python "
            f"values, sizes with dynamic=False) compile each: keep them to a few values, "
            f"or raise max_programs")


def recompile_limit_message(face: str, what: str, limit: int, change: str) -> str:
    """The one warning a compiled object gives when it reaches ``recompile_limit``."""
    return (f"{face}: {what} has been compiled {limit} times (option "
            f"recompile_limit={limit}); calls that would compile again run in eager "
            f"PyTorch, uncompiled, from now on (programs already compiled still run). The "
            f"last change: {change}. Keep dtypes, layouts and the Python values the code "
            f"reads to a few values, or raise recompile_limit")


class ProgramBound:
    """The ``max_programs`` bound every compiled object keeps (trace cache,
    backend, compile_step): past the limit, least recently used programs are
    released, and the first time a warning names what changed in the new
    signature against the nearest kept one (``describe_change``)."""

    def __init__(self, face: str) -> None:
        self.face = face
        self.warned = False

    def enforce(self, key: tuple, keys: Iterable[tuple], limit: int, count, release_oldest,
                what: str, alone: str = "", stacklevel: int | None = None) -> None:
        """While ``count()`` exceeds ``limit``, call ``release_oldest()``; warn
        once before, naming ``what`` was compiled and how ``key`` differs from
        the other ``keys`` (``alone`` when there are none). The warning points
        at ``stacklevel`` frames above the caller, else at the user's call."""
        if count() <= limit:
            return
        if not self.warned:
            self.warned = True
            others = [other for other in keys if other != key]
            change = describe_change(key, others) if others else alone
            level = user_stacklevel() if stacklevel is None else stacklevel + 1
            warnings.warn(limit_message(self.face, what, limit, change), stacklevel=level)
        while count() > limit:
            log.info("%s: releasing the least recently used program (max_programs=%d)",
                     self.face, limit)
            release_oldest()

