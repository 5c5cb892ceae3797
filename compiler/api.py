"""The standalone face: ``retrograd.compile(module_or_fn, **options)``, no dynamo.

The first call with a given signature (shapes, dtypes, devices,
requires_grad flags, non-tensor values, grad mode, autocast) traces the
call through AOTAutograd and compiles it; later calls with that signature
reuse it, and a new signature traces again (trace_cache.py keeps the
graphs). Non-tensor arguments are baked into the trace; so are the Python
values the code reads (a module's ``self.temperature``, a float a function
closes over), and guards (guards.py) trace again when one changes. Modules a
function reaches are lifted into graph inputs (reach.py). Code that needs
tensor values while tracing (``.item()``, ``x[x > 0]``) is handed to
``torch.compile(backend="retrograd")``, with a warning
(dynamo_fallback.py), or with ``data_dependent="error"`` (and always in
``grad``) raises ``UnsupportedError`` (errors.py); hooks run at trace time only and are
warned about (hooks.py). Outputs keep their structure (tuples, dicts,
dataclass outputs such as transformers' ModelOutput); gradients flow
through ordinary autograd.
"""

from __future__ import annotations

import functools
import threading
from typing import Callable

import torch
import torch.utils._pytree as pytree

from retrograd.capture import real_primals
from retrograd.distributed import refuse_for_compile
from retrograd.errors import UnsupportedError
from retrograd.options import Options
from retrograd.reach import reachable_modules
from retrograd.trace_cache import TraceCache

__all__ = ["compile", "grad", "value_and_grad", "CompiledModule", "CompiledFunction",
           "GradFunction", "UnsupportedError"]


class CompiledModule(torch.nn.Module):
    """A drop-in for the wrapped module: same parameters, train/eval, state_dict
    (under ``_orig_mod.`` as with torch.compile), and ``.reports``."""

    def __init__(self, module: torch.nn.Module, options: Options):
        super().__init__()
        self._orig_mod = module
        self._cache = TraceCache(module, options, module)

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
    """A compiled plain function; ``.reports`` as for modules.

    The modules the function reaches (``reach.reachable_modules``: a model it
    closes over, ``models["enc"]``, ``trainer.model``) are lifted as for
    ``grad``: their parameters are graph inputs and get gradients, a
    replaced parameter or train/eval switch traces again.
    """

    def __init__(self, function: Callable, options: Options):
        self._cache = TraceCache(function, options, None,
                                 discover=functools.partial(reachable_modules, function))
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
        refuse_for_compile(target)   # DDP/FSDP: compile inside them (distributed.py)
        return CompiledModule(target, parsed)
    if callable(target):
        return CompiledFunction(target, parsed)
    raise TypeError(f"retrograd.compile: expected an nn.Module or a function, "
                    f"got {type(target).__name__}")


class GradFunction:
    """``grad`` / ``value_and_grad`` of a function, compiled: only the requested
    gradients are computed (see passes/dead_gradient.py)."""

    def __init__(self, function: Callable, argnums, has_aux: bool, with_value: bool,
                 options: Options):
        self.function, self.has_aux, self.with_value = function, has_aux, with_value
        self.single = isinstance(argnums, int)
        if self.single:
            self.argnums = (argnums,)
        else:   # 1.5 or None: refused below, as for any other bad value
            self.argnums = tuple(argnums) if isinstance(argnums, (tuple, list)) else ()
        if not self.argnums or not all(isinstance(a, int) and not isinstance(a, bool)
                                       for a in self.argnums):
            raise ValueError(f"retrograd.grad: argnums={argnums!r} must be an int or a "
                             f"non-empty tuple of ints")
        # the wanted tensor positions of the current call, read by _spec while it
        # traces in the same thread: per thread, so concurrent calls never mix them
        self._call = threading.local()
        self._cache = TraceCache(function, options, None, gradients=self._spec,
                                 closed_over_ok=True,
                                 discover=functools.partial(reachable_modules, function),
                                 face="retrograd.grad", may_split=False)
        functools.update_wrapper(self, function)

    def _spec(self, leaves, slots):
        """Wanted primals: the tensors of the argnums arguments (after the lifted
        modules' parameters and buffers); only the loss's tangent is live
        (auxiliary outputs get no gradient)."""
        from retrograd.passes.dead_gradient import GradientSpec
        offset = len(real_primals(torch.nn.ModuleList(self._cache.lifted), []))
        return GradientSpec(wanted=tuple(offset + w for w in self._call.wanted), live_tangents=(0,))

    def __call__(self, *args, **kwargs):
        count = len(args)
        for argnum in self.argnums:
            if not -count <= argnum < count:
                raise ValueError(f"retrograd.grad: argnums {argnum} is out of range for "
                                 f"{count} positional argument(s)")
        chosen = [a % count for a in self.argnums]
        structures = [pytree.tree_flatten(args[a]) for a in chosen]
        wanted_leaves = [leaf for leaves, _ in structures for leaf in leaves]
        for leaf in wanted_leaves:
            if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
                raise ValueError(f"retrograd.grad: arguments {list(chosen)} must hold floating "
                                 f"point tensors to differentiate, got {type(leaf).__name__}"
                                 + (f" of {leaf.dtype}" if isinstance(leaf, torch.Tensor) else ""))
        # one fresh leaf per occurrence: f(x, x) differentiates each argument
        # on its own (torch.func.grad, jax.grad), not x's total gradient twice
        leaves = [leaf.detach().requires_grad_(True) for leaf in wanted_leaves]
        args, start = list(args), 0
        for argnum, (leaves_of, spec) in zip(chosen, structures):
            args[argnum] = pytree.tree_unflatten(leaves[start:start + len(leaves_of)], spec)
            start += len(leaves_of)
        tensors = [v for v in pytree.tree_flatten((tuple(args), kwargs))[0]
                   if isinstance(v, torch.Tensor)]
        self._call.wanted = tuple(next(i for i, t in enumerate(tensors) if t is leaf)
                                  for leaf in leaves)
        with torch.enable_grad():
            result = self._cache(*args, **kwargs)
        if self.has_aux and not (isinstance(result, (tuple, list)) and len(result) == 2):
            raise ValueError(f"retrograd.grad: with has_aux=True the function must return a "
                             f"pair (loss, aux), got {type(result).__name__}")
        loss, aux = (result[0], result[1]) if self.has_aux else (result, None)
        self._check_loss(loss)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        if all(g is None for g in grads):   # the loss needs only constants or other arguments
            raise ValueError(self._INDEPENDENT)
        grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]
        rebuilt, start = [], 0
        for leaves_of, spec in structures:
            rebuilt.append(pytree.tree_unflatten(grads[start:start + len(leaves_of)], spec))
            start += len(leaves_of)
        gradient = rebuilt[0] if self.single else tuple(rebuilt)
        if self.has_aux:   # like jax.grad and torch.func: aux carries no gradient history
            aux = pytree.tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, aux)
        value = (loss.detach(), aux) if self.has_aux else loss.detach()
        return (value, gradient) if self.with_value else (
            (gradient, aux) if self.has_aux else gradient)

    _INDEPENDENT = "retrograd.grad: the loss does not depend on the differentiated arguments"

    def _check_loss(self, loss) -> None:
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 \
                or not loss.is_floating_point():
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"retrograd.grad: the function must return a scalar floating "
                             f"point loss{' (first of (loss, aux))' if self.has_aux else ''}, "
                             f"got {shape}")
        if not loss.requires_grad:
            raise ValueError(self._INDEPENDENT)

    @property
    def reports(self) -> dict[str, dict]:
        return self._cache.reports


def grad(function: Callable, argnums=0, has_aux: bool = False, **options) -> GradFunction:
    """The gradient of a scalar ``function`` with respect to ``argnums``, compiled.

    Like ``torch.func.grad`` / ``jax.grad``: tensors the function closes over
    (a model's parameters) are constants, so only the requested gradients are
    computed -- ``retrograd.grad(lambda x: model(x).sum())(x)`` computes no
    weight gradient. ``argnums`` is an int or a tuple of ints; an argument may
    be a pytree of tensors (a dict of adapter weights). With ``has_aux`` the
    function returns ``(loss, aux)`` and the result is ``(gradient, aux)``.

    Example:
        >>> g = retrograd.grad(lambda x: (x.sin() ** 2).sum())
        >>> g(torch.randn(3))
    """
    return GradFunction(function, argnums, has_aux, False, Options.from_mapping(options))


def value_and_grad(function: Callable, argnums=0, has_aux: bool = False,
                   **options) -> GradFunction:
    """Like ``grad`` but returns ``(value, gradient)``; value is ``(loss, aux)``
    with ``has_aux``."""
    return GradFunction(function, argnums, has_aux, True, Options.from_mapping(options))
