"""The standalone face: ``retrograd.compile(module_or_fn, **options)``, no dynamo.

The first call with a given signature (shapes, dtypes, devices,
requires_grad flags, non-tensor values, grad mode, autocast) traces the
call through AOTAutograd and compiles it; later calls with that signature
reuse it, and a new signature traces again. Non-tensor arguments are baked
into the trace. Outputs keep their structure (tuples, dicts, dataclass
outputs such as transformers' ModelOutput); gradients flow through ordinary
autograd.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from retrograd.capture import compile_graph, signature
from retrograd.options import Options

__all__ = ["compile", "CompiledModule", "CompiledFunction"]


class _Flat(torch.nn.Module):
    """``target(*args, **kwargs)`` as a module of tensor inputs and tensor outputs.

    AOTAutograd wants flat tensor inputs and a tuple of tensors out; this
    module rebuilds the user's arguments around the tensors and records how
    to rebuild the user's output structure.
    """

    def __init__(self, target: Callable, in_spec, leaves: list, tensor_slots: list[int]):
        super().__init__()
        self.target = target
        self.in_spec = in_spec
        self.leaves = leaves
        self.tensor_slots = tensor_slots
        self.out_spec = None
        self.out_constants: dict[int, Any] = {}
        self.out_tensor_slots: list[int] = []

    def forward(self, *tensors):
        leaves = list(self.leaves)
        for slot, tensor in zip(self.tensor_slots, tensors):
            leaves[slot] = tensor
        args, kwargs = pytree.tree_unflatten(leaves, self.in_spec)
        result = self.target(*args, **kwargs)
        out_leaves, self.out_spec = pytree.tree_flatten(result)
        self.out_tensor_slots = [i for i, v in enumerate(out_leaves) if isinstance(v, torch.Tensor)]
        self.out_constants = {i: v for i, v in enumerate(out_leaves)
                              if not isinstance(v, torch.Tensor)}
        return tuple(out_leaves[i] for i in self.out_tensor_slots)

    def rebuild(self, tensors) -> Any:
        leaves = [None] * (len(self.out_tensor_slots) + len(self.out_constants))
        for slot, tensor in zip(self.out_tensor_slots, tensors):
            leaves[slot] = tensor
        for slot, value in self.out_constants.items():
            leaves[slot] = value
        return pytree.tree_unflatten(leaves, self.out_spec)


class _Cache:
    """One compiled graph per call signature."""

    def __init__(self, target: Callable, options: Options, module: torch.nn.Module | None):
        self.target = target
        self.options = options
        self.module = module
        self.entries: dict[tuple, tuple[Any, Any, _Flat]] = {}
        self.last: tuple | None = None

    def __call__(self, *args, **kwargs):
        leaves, in_spec = pytree.tree_flatten((args, kwargs))
        slots = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
        tensors = [leaves[i] for i in slots]
        key = signature(leaves) + self._module_key()
        if key not in self.entries:
            constants = [None if isinstance(v, torch.Tensor) else v for v in leaves]
            flat = _Flat(self.target, in_spec, constants, slots)
            compiled, compiler = compile_graph(flat, tensors, self.options)
            _refuse_closed_over_grads(compiler, self.module)
            self.entries[key] = (compiled, compiler, flat)
        self.last = key
        compiled, _, flat = self.entries[key]
        return flat.rebuild(compiled(*tensors))

    def _module_key(self) -> tuple:
        """The module state a trace bakes in: train/eval of every submodule, which
        parameters want gradients, and which tensors the parameters and buffers are
        (the compiled graph keeps the ones it was traced with, so a replaced or
        converted tensor must trace again)."""
        if self.module is None:
            return ()
        state = [*self.module.parameters(), *self.module.buffers()]
        return (("training", tuple(m.training for m in self.module.modules())),
                ("requires_grad", tuple(p.requires_grad for p in self.module.parameters())),
                ("state", tuple((id(t), t.dtype, tuple(t.shape), t.device) for t in state)))

    @property
    def reports(self) -> dict[str, dict]:
        if self.last is None:
            return {}
        return self.entries[self.last][1].reports


def _refuse_closed_over_grads(compiler, module) -> None:
    """Code that closes over tensors requiring grad (other than a module's own
    parameters) would silently lose their gradients: AOTAutograd bakes them in
    as constants. Under no_grad nothing is lost."""
    closed = compiler.closed_over_grads
    if closed and torch.is_grad_enabled():
        what = "the function" if module is None else f"{type(module).__name__}.forward"
        raise ValueError(
            f"retrograd.compile: {what} closes over tensors that require grad "
            f"({', '.join(closed)}); their gradients would be lost. Pass them as "
            f"arguments, or make them parameters of an nn.Module")


class CompiledModule(torch.nn.Module):
    """A drop-in for the wrapped module: same parameters, train/eval, state_dict
    (under ``_orig_mod.`` as with torch.compile), and ``.reports``."""

    def __init__(self, module: torch.nn.Module, options: Options):
        super().__init__()
        self._orig_mod = module
        self._cache = _Cache(module, options, module)

    def forward(self, *args, **kwargs):
        return self._cache(*args, **kwargs)

    @property
    def reports(self) -> dict[str, dict]:
        """The forward and backward reports of the last signature called."""
        return self._cache.reports

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._orig_mod, name)


class CompiledFunction:
    """A compiled plain function; ``.reports`` as for modules."""

    def __init__(self, function: Callable, options: Options):
        self._cache = _Cache(function, options, None)
        functools.update_wrapper(self, function)

    def __call__(self, *args, **kwargs):
        return self._cache(*args, **kwargs)

    @property
    def reports(self) -> dict[str, dict]:
        return self._cache.reports


def compile(target: Callable | None = None, **options):
    """Compile a module or function for training with retrograd.

    Args:
        target: an ``nn.Module`` or a function of tensors. Omit it to get a
            decorator: ``@retrograd.compile(executor="fx")``.
        **options: the options of ``retrograd.Options`` (memory_budget,
            dump_dir, executor, disable, verify).

    Returns:
        A ``CompiledModule`` for modules, a ``CompiledFunction`` otherwise.

    Example:
        >>> model = retrograd.compile(torch.nn.Linear(4, 4))
        >>> model(torch.randn(2, 4)).sum().backward()
    """
    parsed = Options.from_mapping(options)
    if target is None:
        return functools.partial(compile, **options)
    if isinstance(target, torch.nn.Module):
        return CompiledModule(target, parsed)
    if callable(target):
        return CompiledFunction(target, parsed)
    raise TypeError(f"retrograd.compile: expected an nn.Module or a function, "
                    f"got {type(target).__name__}")
