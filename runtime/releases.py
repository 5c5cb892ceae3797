"""Generated modules live as long as the programs that use them.

A loaded kernel module is referenced from process-wide places besides the
program that launches it: Triton registers every ``JITFunction`` by name
(``triton.runtime.jit._triton_jit_function_registry``, read only by
``JITFunction.preload``), its interpreter caches each rewritten kernel
(``InterpretedFunction.rewritten_fn``), and ``linecache`` holds the source
Triton reads back. Those hold the module's globals, so the module itself
cannot tell when its last user is gone.

``handle`` therefore hands out a second module object that those places never
see: its functions are thin wrappers (one more Python call per launch)
that refer back to it, so it lives exactly as long as a program holds one of them (or the
handle). When it dies, its finalizer records the release, and the loader
(``forget_released``, under its lock, at the next load) removes the
module's entries from those caches; the linecache entry goes once no live
handle of that file is left. Finalizers only append to a list: they run
inside garbage collection, where taking a lock could deadlock.
"""

from __future__ import annotations

import functools
import linecache
import sys
import weakref
from collections.abc import Mapping
from types import FunctionType, ModuleType

__all__ = ["forget_released", "handle"]

#: (file name, the module's globals) of handles that died, until forgotten
_RELEASED: list[tuple[str, dict]] = []


def handle(module: ModuleType, filename: str) -> ModuleType:
    """The object ``load_module`` returns for ``module``: the same names, its
    own functions wrapped so that holding one keeps the handle alive."""
    outer = ModuleType(module.__name__)
    for name, value in module.__dict__.items():
        if isinstance(value, FunctionType) and value.__globals__ is module.__dict__:
            value = _wrapped(value, outer)
        outer.__dict__[name] = value
    finalizer = weakref.finalize(outer, _RELEASED.append, (filename, module.__dict__))
    finalizer.atexit = False
    return outer


def _wrapped(function: FunctionType, outer: ModuleType) -> FunctionType:
    """``function`` called through a wrapper that keeps ``outer`` alive;
    ``inspect`` still finds the original (``__wrapped__``)."""
    @functools.wraps(function)
    def call(*args, **kwargs):
        return function(*args, **kwargs)
    call.__retrograd_handle__ = outer
    return call


def forget_released(live: Mapping[tuple[str, bool], ModuleType]) -> int:
    """Drop what process-wide caches hold of released modules; ``live`` maps
    (file name, interpreted) to the handles still alive. Returns how many."""
    count = 0
    while _RELEASED:
        filename, namespace = _RELEASED.pop()
        _forget_in_triton(namespace)
        if not any(live.get((filename, mode)) is not None for mode in (False, True)):
            entry = linecache.cache.get(filename)
            if entry is not None and len(entry) == 4 and entry[1] is None:
                del linecache.cache[filename]   # ours: set without mtime by the loader
        count += 1
    return count


def _forget_in_triton(namespace: dict) -> None:
    """Remove the kernels of the module whose globals are ``namespace`` from
    Triton's registry by name and from its interpreter's rewrite cache."""
    jit = sys.modules.get("triton.runtime.jit")
    registry = getattr(jit, "_triton_jit_function_registry", None)
    if isinstance(registry, dict):
        prefix = f"{namespace.get('__name__')}:"
        for name in [name for name in list(registry) if name.startswith(prefix)]:
            registry.pop(name, None)
    interpreter = sys.modules.get("triton.runtime.interpreter")
    rewritten = getattr(getattr(interpreter, "InterpretedFunction", None), "rewritten_fn", None)
    if isinstance(rewritten, dict):
        for function in [f for f in list(rewritten)
                         if getattr(f, "__globals__", None) is namespace]:
            rewritten.pop(function, None)
