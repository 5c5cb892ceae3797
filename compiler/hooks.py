"""Module hooks under the standalone face.

A forward (pre-)hook runs while the call is traced, on fake/functional
tensors: what it does to the output is compiled into the graph, but its
Python side effects (appending activations to a list, logging, counting)
happen at trace time only; a full backward hook likewise runs once, while
the backward is traced. Dynamo runs hooks on every call, the standalone face
cannot, so it warns once per hook naming it, and keys its cache on which
hooks are registered (adding or removing one traces again).
"""

from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch.nn.modules import module as module_globals

from retrograd.errors import user_stacklevel

__all__ = ["hook_key", "warn_about_hooks"]

#: (attribute of nn.Module, what the message calls it)
_KINDS = (("_forward_pre_hooks", "forward pre-hook"), ("_forward_hooks", "forward hook"),
          ("_backward_pre_hooks", "backward pre-hook"), ("_backward_hooks", "backward hook"))

#: global hooks (torch.nn.modules.module.register_module_*_hook)
_GLOBAL = (("_global_forward_pre_hooks", "global forward pre-hook"),
           ("_global_forward_hooks", "global forward hook"),
           ("_global_backward_pre_hooks", "global backward pre-hook"),
           ("_global_backward_hooks", "global backward hook"))

#: handle ids already warned about (RemovableHandle ids are unique in a process)
_warned: set[int] = set()


def hook_key(modules: Iterable[torch.nn.Module]) -> tuple:
    """Which hooks are registered on ``modules`` (all submodules) and globally."""
    key = []
    for index, sub in enumerate(modules):
        for attribute, _ in _KINDS:
            hooks = sub.__dict__.get(attribute)
            if hooks:
                key.append((index, attribute, tuple(hooks)))
    for attribute, _ in _GLOBAL:
        hooks = getattr(module_globals, attribute, None)
        if hooks:
            key.append(("global", attribute, tuple(hooks)))
    return tuple(key)


def _name(hook) -> str:
    return getattr(hook, "__qualname__", None) or type(hook).__name__


def warn_about_hooks(named: Iterable[tuple[str, torch.nn.Module]], what: str) -> None:
    """Warn once per hook found on the ``(path, module)`` pairs or globally."""
    found = []
    for path, sub in named:
        for attribute, kind in _KINDS:
            for handle, hook in (sub.__dict__.get(attribute) or {}).items():
                found.append((handle, f"{kind} {_name(hook)!r} on {path} ({type(sub).__name__})"))
    for attribute, kind in _GLOBAL:
        for handle, hook in (getattr(module_globals, attribute, None) or {}).items():
            found.append((handle, f"{kind} {_name(hook)!r}"))
    for handle, description in found:
        if handle in _warned:
            continue
        _warned.add(handle)
        warnings.warn(f"{what}: the {description} runs only while the call is traced, on "
                      f"fake tensors; what it returns is compiled in, but its side effects do "
                      f"not run on later calls. torch.compile(..., backend=\"retrograd\") "
                      f"runs hooks on every call", stacklevel=user_stacklevel())
