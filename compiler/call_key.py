"""The per-call part of the standalone face's cache key, made cheaply.

Every call of a ``retrograd.compile``'d module or function flattens its
arguments and reads the module state its trace baked in (trace_cache.py).
That work runs on every step, so it is written for speed here, with the
same meaning as the plain version (a test compares the two on each kind of
change: tests/test_call_key.py):

- ``flatten_call``: a call of plain tensors by position (the common case)
  is its own list of leaves; anything else goes through ``tree_flatten``.
  The key holds the call's structure (``("call", ...)``): without it a call
  ``f((x, y))`` or ``f(b=x)`` reused the program traced for ``f(x, y)`` or
  ``f(a=x)``, whose leaves and signature are the same.
- ``module_state_key``: one walk of the module tree without the qualified
  names ``modules()`` builds, and a tensor's shape as its ``torch.Size``
  (equal to, and hashed as, the tuple of its sizes).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

from retrograd.hooks import _KINDS, hook_key

__all__ = ["call_structure", "flatten_call", "module_state_key", "submodules"]

#: The hook dicts of a module (hooks.py)
_HOOK_ATTRIBUTES = tuple(attribute for attribute, _ in _KINDS)

#: Argument types ``tree_flatten`` keeps as leaves (exact types: a subclass may
#: be registered as a pytree node, so it takes the general path).
_LEAF_TYPES = frozenset({torch.Tensor, torch.nn.Parameter})


def flatten_call(args: tuple, kwargs: dict) -> tuple[list, Any, Any]:
    """``(leaves, structure, in_spec)`` of a call: ``leaves`` as ``tree_flatten``
    gives them; ``structure`` a hashable stand-in for the call's tree (the
    count of positional tensors, or the ``TreeSpec``); ``in_spec`` the
    ``TreeSpec``, or None where it was not needed (``call_structure`` makes it)."""
    if not kwargs:
        for value in args:
            if type(value) not in _LEAF_TYPES:
                break
        else:
            return list(args), len(args), None
    leaves, in_spec = pytree.tree_flatten((args, kwargs))
    return leaves, in_spec, in_spec


def call_structure(args: tuple, kwargs: dict) -> Any:
    """The call's ``TreeSpec`` (what ``Flat`` rebuilds the arguments with)."""
    return pytree.tree_structure((args, kwargs))


def submodules(module: torch.nn.Module) -> list[torch.nn.Module]:
    """``list(module.modules())``, in the same order (pre-order, each module
    once), without building the qualified names ``named_modules`` yields."""
    found: list[torch.nn.Module] = []
    seen: set[int] = set()
    stack = [module]
    while stack:
        sub = stack.pop()
        if id(sub) in seen:
            continue
        seen.add(id(sub))
        found.append(sub)
        children = [child for child in sub._modules.values() if child is not None]
        children.reverse()
        stack += children
    return found


def module_state_key(modules: list[torch.nn.Module], lifted: list[torch.nn.Module]) -> tuple:
    """The module state a trace bakes in (see ``TraceCache._module_key``): which
    modules are lifted, which submodules they hold, train/eval of each, its
    hooks (``hooks.hook_key``'s entries, read in the same pass), which
    parameters want gradients, and which tensors the parameters and buffers
    are (identity, dtype, shape, device)."""
    if not modules:
        return ()
    subs = [sub for module in modules for sub in submodules(module)]
    held, training, hooks = [], [], []
    for index, sub in enumerate(subs):
        held.append((id(sub), type(sub)))
        training.append(sub.training)
        attributes = sub.__dict__
        for attribute in _HOOK_ATTRIBUTES:
            registered = attributes.get(attribute)
            if registered:
                hooks.append((index, attribute, tuple(registered)))
    parameters = [p for sub in subs for p in sub._parameters.values() if p is not None]
    buffers = [b for sub in subs for b in sub._buffers.values() if b is not None]
    return (("lifted", tuple([id(module) for module in lifted])),
            ("modules", tuple(held)),
            ("training", tuple(training)),
            ("hooks", tuple(hooks) + hook_key(())),   # () : the global hooks only
            ("requires_grad", tuple([p.requires_grad for p in parameters])),
            ("state", tuple([(id(t), t.dtype, t.shape, t.device)
                             for t in parameters + buffers])))
