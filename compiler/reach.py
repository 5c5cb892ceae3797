"""What a function reaches by name, for the standalone face.

The standalone face runs no bytecode analysis (that is dynamo's job), so it
reads what it can from the function object itself: ``self`` of a bound
method, closure cells, default arguments, and the globals its code names
(nested code objects such as lambdas and comprehensions included). Each is a
``Reference``: a label for messages and a getter that reads the current
value, so a guard can check later whether the value changed.

Two users: ``guards.function_guards`` (Python numbers and flags the trace
baked in) and ``reachable_modules`` (the modules ``grad`` lifts into graph
inputs, found through dicts, lists, tuples and object attributes as well).
"""

from __future__ import annotations

import dis
import functools
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

__all__ = ["Reference", "MISSING", "references", "reachable_modules", "is_plain_object",
           "library_function", "attribute_names"]

#: What a getter returns for a name that no longer resolves (an empty cell, a deleted global).
MISSING = object()

#: Containers and objects larger than this are not searched (a dataset in a global).
MAX_ITEMS = 256


@dataclass(frozen=True)
class Reference:
    """A value a function reads by name: ``label`` names it in messages
    ("closure cell 'scale' of f"), ``get()`` reads it now."""

    label: str
    get: Callable[[], Any]


def _cell_getter(cell) -> Callable[[], Any]:
    def get():
        try:
            return cell.cell_contents
        except ValueError:   # an empty cell
            return MISSING
    return get


@functools.lru_cache(maxsize=1024)
def _names(code: types.CodeType, globals_: bool) -> frozenset[str]:
    """The global names (``LOAD_GLOBAL``) or the attribute names (``LOAD_ATTR``,
    ``LOAD_METHOD``) ``code`` reads, nested code objects (lambdas,
    comprehensions) included."""
    wanted = ("LOAD_GLOBAL", "LOAD_NAME") if globals_ else ("LOAD_ATTR", "LOAD_METHOD")
    names = {instruction.argval for instruction in dis.get_instructions(code)
             if instruction.opname in wanted}
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            names |= _names(constant, globals_)
    return frozenset(names)


def attribute_names(function: Callable) -> frozenset[str]:
    """The attribute names ``function``'s code reads (``cfg.scale`` gives "scale")."""
    code = getattr(getattr(function, "__func__", function), "__code__", None)
    return _names(code, False) if code is not None else frozenset()


def library_function(function: Callable) -> bool:
    """Functions of torch and retrograd are not searched: their globals are
    internals the user does not set, and following them would be slow."""
    module = getattr(function, "__module__", None) or ""
    return module.split(".")[0] in ("torch", "retrograd", "functools", "typing")


def references(function: Callable) -> Iterator[Reference]:
    """The values ``function`` reads by name (one level: not through helpers).

    A ``functools.partial`` yields its function and bound arguments.
    """
    if isinstance(function, functools.partial):
        yield Reference("the partial's function", lambda: function.func)
        for index, value in enumerate(function.args):
            yield Reference(f"partial argument {index}", lambda value=value: value)
        for key, value in function.keywords.items():
            yield Reference(f"partial argument {key!r}", lambda value=value: value)
        return
    name = getattr(function, "__qualname__", type(function).__name__)
    if isinstance(function, types.MethodType):
        owner = function.__self__
        yield Reference(f"self of {name}", lambda: owner)
        function = function.__func__
    if not isinstance(function, types.FunctionType):
        return
    code = function.__code__
    for variable, cell in zip(code.co_freevars, function.__closure__ or ()):
        yield Reference(f"closure variable {variable!r} of {name}", _cell_getter(cell))
    for index, _ in enumerate(function.__defaults__ or ()):
        yield Reference(f"default argument {index} of {name}",
                        lambda index=index: (function.__defaults__ or ())[index])
    for key in function.__kwdefaults__ or {}:
        yield Reference(f"default argument {key!r} of {name}",
                        lambda key=key: (function.__kwdefaults__ or {}).get(key, MISSING))
    globals_ = function.__globals__
    for variable in sorted(_names(code, True)):
        if variable in globals_:
            yield Reference(f"global {variable!r} read by {name}",
                            lambda variable=variable: globals_.get(variable, MISSING))


def is_plain_object(value: Any) -> bool:
    """An instance of an ordinary class (a config, a trainer holding a model):
    its attributes are searched; modules, tensors, classes, functions and
    Python modules are not plain."""
    if isinstance(value, (torch.nn.Module, torch.Tensor, type, types.ModuleType,
                          types.FunctionType, types.BuiltinFunctionType, types.MethodType,
                          functools.partial)):
        return False
    attributes = getattr(value, "__dict__", None)
    return isinstance(attributes, dict) and len(attributes) <= MAX_ITEMS


def _children(value: Any) -> list:
    """What the module search looks inside: container items, plain objects'
    attributes, the values a (user) function reads by name."""
    if isinstance(value, dict):
        return list(value.values()) if len(value) <= MAX_ITEMS else []
    if isinstance(value, (list, tuple, set, frozenset)):
        return list(value) if len(value) <= MAX_ITEMS else []
    if isinstance(value, types.MethodType):   # self, even of a library method
        return [value.__self__, value.__func__]
    if isinstance(value, (types.FunctionType, functools.partial)):
        if library_function(value):
            return []
        return [reference.get() for reference in references(value)]
    if is_plain_object(value):
        return list(vars(value).values())
    return []


def reachable_modules(function: Callable, depth: int = 4) -> list[torch.nn.Module]:
    """The modules ``function`` reaches: by name, then through dicts, lists,
    tuples, sets, attributes of plain objects and helper functions, at most
    ``depth`` steps; outermost only (a submodule of a found module is part of it).

    Example: ``lambda x: models["enc"](x)`` and ``lambda x: trainer.model(x)``
    both reach the module.
    """
    found: list[torch.nn.Module] = []
    seen: set[int] = set()
    frontier = [function]
    for _ in range(depth + 1):
        following = []
        for value in frontier:
            if id(value) in seen or value is MISSING:
                continue
            seen.add(id(value))
            if isinstance(value, torch.nn.Module):
                found.append(value)
            else:
                following.extend(_children(value))
        frontier = following
    if len(found) < 2:   # the usual case, and this runs on every call: no tree walk
        return found
    inner = {id(sub) for module in found for sub in module.modules() if sub is not module}
    return [module for module in found if id(module) not in inner]
