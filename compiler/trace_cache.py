"""Compiled graphs per call signature, for the standalone face.

``TraceCache`` flattens a call's arguments (pytrees) into tensors and
constants, keys it on its signature and the module state it bakes in
(``capture.signature``, train/eval, hooks, which tensors the parameters
are), and keeps for each key the compiled graphs with the guards on the
Python state their traces read (guards.py). The first whose guards hold
runs; otherwise the call traces again through AOTAutograd
(``capture.compile_graph``). Code that needs tensor values while tracing
is handed to dynamo from then on (dynamo_fallback.py), or, where the face
or ``data_dependent="error"`` forbids it, raises ``UnsupportedError``
(errors.py); hooks are warned about (hooks.py).

Automatic dynamic shapes (dynamic.py): once a dimension of an input has
taken a second size, the call is traced with that dimension symbolic and
the program is kept under the signature without those sizes, with the
shape guards of its trace; later sizes reuse it. Every compile after the
first is logged with what changed; past ``recompile_limit`` compiles, new
signatures run in eager PyTorch, with one warning.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch

from retrograd.call_key import call_structure, flatten_call, module_state_key
from retrograd.capture import compile_graph, signature
from retrograd.flat import Flat as _Flat
from retrograd.dynamic import (ShapeGuards, SizeHistory, abstract_key, compile_symbolic,
                               describe_dims, every_dim, family, symbolic_inputs)
from retrograd.dynamo_fallback import DynamoFallback
from retrograd.errors import (DATA_DEPENDENT, data_dependent_error, data_dependent_reason,
                              user_stacklevel)
from retrograd.guards import (Guards, function_guards, module_function_guards,
                              module_read_guards, recording_module_reads)
from retrograd.hooks import warn_about_hooks
from retrograd.locking import compiling
from retrograd.options import Options
from retrograd.recompiles import ProgramBound, describe_change, recompile_limit_message

__all__ = ["TraceCache", "MAX_ENTRIES"]

#: Graphs kept per signature (each for other guarded Python values), as dynamo's cache limit.
MAX_ENTRIES = 8

log = logging.getLogger("retrograd")


@dataclass
class _Entry:
    """One compiled graph: AOTAutograd's callable, our compiler (its reports),
    the wrapper that rebuilds outputs, and the Python values it was traced with."""

    compiled: Any
    compiler: Any
    flat: _Flat
    guards: Guards
    shapes: ShapeGuards | None = None   # a symbolic program's shape guards
    single: bool = False   # the output is one tensor: no structure to rebuild


class TraceCache:
    """Compiled graphs per call signature, each with guards on the Python state
    its trace baked in (guards.py); a signature whose guards all fail traces again."""

    def __init__(self, target: Callable, options: Options, module: torch.nn.Module | None,
                 gradients=None, closed_over_ok: bool = False,
                 discover: Callable[[], list[torch.nn.Module]] | None = None,
                 face: str = "retrograd.compile", may_split: bool = True):
        self.target = target
        self.options = options
        self.module = module
        # modules a function reaches (reach.py): their parameters and buffers
        # become graph inputs, so a BatchNorm's running statistics are written
        # back and a replaced parameter is seen; found again on every call
        self.discover = discover
        self.lifted: list[torch.nn.Module] = []
        self.gradients = gradients            # dead_gradient.GradientSpec, or None: all
        self.closed_over_ok = closed_over_ok  # grad(): closed-over parameters are constants
        # least recently used signature first; at most options.max_programs
        # entries in all (recompiles.py)
        self.entries: OrderedDict[tuple, list[_Entry]] = OrderedDict()
        self.lock = threading.Lock()   # entries, for threads sharing this object
        self.last: _Entry | None = None
        self.face = face
        self.changed: str | None = None   # the guard that failed last
        self.warned_retracing = False
        self.bound = ProgramBound(self.face)
        self.may_split = may_split   # data-dependent code may go to dynamo
        self.fallback: DynamoFallback | None = None
        self.what = (getattr(target, "__qualname__", "the function") if module is None
                     else f"{type(module).__name__}.forward")
        self.sizes = SizeHistory()     # automatic dynamic shapes (dynamic.py)
        self.symbolic_dims: list[frozenset] = []   # the dims of each symbolic program kept
        self.static_only: dict[tuple, str] = {}    # family -> why its symbolic trace failed
        self.compiles = 0
        self.eager: str | None = None  # past recompile_limit: why new signatures run eagerly

    def __call__(self, *args, **kwargs):
        if self.fallback is not None:
            return self.fallback(*args, **kwargs)
        leaves, structure, in_spec = flatten_call(args, kwargs)
        slots = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
        tensors = [leaves[i] for i in slots]
        if self.discover is not None:
            self.lifted = self.discover()
        key = signature(leaves) + self._module_key(structure)
        entry = self._lookup(key) or self._lookup_symbolic(leaves, tensors, structure)
        if entry is None:
            in_spec = call_structure(args, kwargs) if in_spec is None else in_spec
            entry = self._compile(leaves, in_spec, slots, tensors, structure)
        if entry is None:   # dynamo from now on, or eager past recompile_limit
            self.last = None
            return (self.fallback or self.target)(*args, **kwargs)
        self.last = entry
        outputs = entry.compiled(*tensors)
        return outputs[0] if entry.single else entry.flat.rebuild(outputs)

    def _compile(self, leaves, in_spec, slots, tensors, structure) -> _Entry | None:
        """Trace and keep the graph of this call, or ``None`` once the call is
        handed to dynamo. The key is made and looked up again under the
        compile lock: threads making the first call of a signature together
        wait for one trace and all use it, instead of each tracing in turn.
        Made again because a trace in another thread swaps the module's
        parameters for its own while it runs (AOTAutograd's functional call),
        so a key made meanwhile names tensors that are gone."""
        with compiling():
            key = signature(leaves) + self._module_key(structure)
            entry = (self._lookup(key, again=True)
                     or self._lookup_symbolic(leaves, tensors, structure, again=True))
            if entry is not None or self.fallback is not None or self._past_limit(key):
                return entry
            dims, failed = self._dynamic_dims(leaves), None
            if dims:
                entry, failed = self._try_symbolic(leaves, in_spec, slots, dims)
                if entry is not None:
                    self._keep(abstract_key(leaves, dims) + self._module_key(structure),
                               entry)
                    return entry
            self._log_recompile(self._change(key))
            try:
                entry = self._trace(leaves, in_spec, slots, tensors)
                if failed is not None:   # not the call's own error: static from now on
                    self._static_from_now_on(leaves, dims, failed)
            except DATA_DEPENDENT as error:
                what = f"{self.face} of {self.what}"
                if not self.may_split or self.options.data_dependent == "error":
                    raise data_dependent_error(error, what) from error
                self.fallback = DynamoFallback(self.target, self.options,
                                               data_dependent_reason(error, what))
                return None
            self._keep(key, entry)
            return entry

    def _keep(self, key: tuple, entry: _Entry) -> None:
        """Store ``entry``; past ``MAX_ENTRIES`` graphs for one signature the
        oldest goes (a value that changes on every call would otherwise keep
        every graph alive), with a warning once per cache; then the bound on
        all signatures together (``_bound``)."""
        with self.lock:
            kept = self.entries.setdefault(key, [])
            kept.append(entry)
            self.entries.move_to_end(key)   # most recently used
            if len(kept) > MAX_ENTRIES:
                del kept[0]
                if not self.warned_retracing:
                    self.warned_retracing = True
                    warnings.warn(f"{self.face}: {self.what} was traced more than "
                                  f"{MAX_ENTRIES} times for one signature because Python "
                                  f"values it reads keep changing (last: {self.changed}); "
                                  f"pass such a value as a tensor argument",
                                  stacklevel=user_stacklevel())
            self._bound(key)

    def _bound(self, key: tuple) -> None:
        """Release least recently used graphs until at most ``max_programs`` are
        kept (recompiles.ProgramBound). A released graph is referenced from
        nowhere else (``self.last`` moves to the new one), so its program,
        kernels and arenas are freed (a thread running it meanwhile holds it
        until its call ends). Called holding ``self.lock``."""
        def release_oldest():
            oldest = next(iter(self.entries))   # the new key only when it is alone
            kept = self.entries[oldest]
            del kept[0]
            if not kept:
                del self.entries[oldest]
        self.bound.enforce(key, self.entries, self.options.max_programs,
                           lambda: sum(map(len, self.entries.values())), release_oldest,
                           self.what, alone=f"a Python value it reads ({self.changed})")

    def _lookup(self, key: tuple, again: bool = False, tensors=None) -> _Entry | None:
        """The entry of ``key`` whose guards (and shape guards, for a symbolic
        program run on ``tensors``) hold; logs why the others fail (once: not
        when looked up ``again`` under the compile lock)."""
        with self.lock:
            for entry in list(self.entries.get(key, ())):
                if entry.shapes is not None and not entry.shapes.hold(tensors):
                    continue
                changed = entry.guards.failing()
                if changed is None:
                    self.entries.move_to_end(key)   # most recently used
                    return entry
                if not again:
                    log.info("%s: tracing %s again: %s changed", self.face, self.what,
                             changed)
                self.changed = changed
        return None

    # -- automatic dynamic shapes (dynamic.py) -----------------------------------------------
    def _lookup_symbolic(self, leaves, tensors, structure,
                         again: bool = False) -> _Entry | None:
        """A kept symbolic program this call fits (newest first), or None."""
        for dims in reversed(self.symbolic_dims):
            key = abstract_key(leaves, dims) + self._module_key(structure)
            entry = self._lookup(key, again, tensors)
            if entry is not None:
                return entry
        return None

    def _dynamic_dims(self, leaves) -> frozenset:
        """The dimensions to trace symbolic: those that took two sizes (or all
        of them with ``dynamic=True``; none with ``dynamic=False``, or where a
        symbolic trace of this family failed)."""
        seen = self.sizes.observe(leaves)
        if self.options.dynamic is False or family(leaves) in self.static_only:
            return frozenset()
        return every_dim(leaves) if self.options.dynamic else seen

    def _try_symbolic(self, leaves, in_spec, slots, dims) -> tuple[_Entry | None, str | None]:
        """Trace this call with ``dims`` symbolic: (entry, None), or (None, why
        the symbolic trace failed)."""
        shown = describe_dims(dims)
        self._log_recompile(f"{shown} took another size: tracing with "
                            f"{'it' if len(dims) == 1 else 'them'} symbolic")
        fakes, env = symbolic_inputs(leaves, slots, dims)

        def trace(flat, gradients=None):
            return compile_symbolic(flat, fakes, f"{self.face} of {self.what}", shown,
                                    self.options, gradients)
        try:
            entry = self._trace(leaves, in_spec, slots, fakes, trace)
        except Exception as error:   # noqa: BLE001 - the static path handles it, or says why
            self.compiles -= 1   # the static trace that follows counts instead
            text = str(error).splitlines()[0] if str(error) else ""
            return None, f"{type(error).__name__}: {text}"
        entry.shapes = ShapeGuards(env, fakes)
        entry.compiler.set_guards(entry.shapes.text())
        self.symbolic_dims = [d for d in self.symbolic_dims if d != dims] + [dims]
        return entry, None

    def _static_from_now_on(self, leaves, dims, reason: str) -> None:
        """A symbolic trace failed where the static one worked: this family
        of calls compiles a static program per size from now on (logged)."""
        self.static_only[family(leaves)] = reason
        log.warning("%s: %s could not be traced with %s symbolic (%s); each size of it is "
                    "compiled as its own static program", self.face, self.what,
                    describe_dims(dims), reason)

    def _log_recompile(self, change: str) -> None:
        """Count a compile; from the second on, log what made it."""
        self.compiles += 1
        if self.compiles > 1:
            log.info("%s: compiling %s again (compile %d): %s", self.face, self.what,
                     self.compiles, change)

    def _change(self, key: tuple) -> str:
        """What this call changed from the programs kept (recompiles.py)."""
        if key in self.entries:
            return f"{self.changed} changed"
        return describe_change(key, list(self.entries))

    def _past_limit(self, key: tuple) -> bool:
        """Whether ``recompile_limit`` compiles were made already: this call
        then runs eagerly (``__call__``), with one warning."""
        limit = self.options.recompile_limit
        if limit is None or self.compiles < limit:
            return False
        if self.eager is None:
            self.eager = recompile_limit_message(self.face, self.what, limit,
                                                 self._change(key))
            log.warning(self.eager)
            warnings.warn(self.eager, stacklevel=user_stacklevel())
        return True

    def _trace(self, leaves, in_spec, slots, tensors, trace=None) -> _Entry:
        """Trace and compile the call: ``compile_graph`` on ``tensors``, or
        ``trace(flat)`` (a symbolic trace, where ``tensors`` are its fakes)."""
        constants = [None if isinstance(v, torch.Tensor) else v for v in leaves]
        flat = _Flat(self.target, in_spec, constants, slots)
        if self.lifted:
            flat.lifted = torch.nn.ModuleList(self.lifted)
        gradients = self.gradients(leaves, slots) if callable(self.gradients) else None
        watched = self._named_modules()
        guards = Guards()
        if self.module is None:
            function_guards(self.target, guards)
        module_function_guards(self._modules(), guards)
        warn_about_hooks(watched, f"{self.face} of {self.what}")
        with recording_module_reads() as reads:
            compiled, compiler = (trace(flat, gradients) if trace is not None else compile_graph(
                flat, tensors, self.options, gradients=gradients))
        module_read_guards(reads, {id(sub): label for label, sub in watched}, guards)
        guards.refresh(f"{self.face}: {self.what}")
        if not self.closed_over_ok:
            _refuse_closed_over_grads(compiler, self.module)
        single = (flat.out_spec is not None and flat.out_spec.is_leaf()
                  and flat.out_tensor_slots == [0] and not flat.out_constants)
        return _Entry(compiled, compiler, flat, guards, single=single)

    def _modules(self) -> list[torch.nn.Module]:
        return ([self.module] if self.module is not None else []) + self.lifted

    def _named_modules(self) -> list[tuple[str, torch.nn.Module]]:
        """(label, submodule) for every submodule of the modules the call uses
        (compiled or lifted), labelled by the class of the outer module, then
        the path ("Tempered.act")."""
        named = []
        for module in self._modules():
            for path, sub in module.named_modules(remove_duplicate=False):
                named.append((".".join(filter(None, (type(module).__name__, path))), sub))
        return named

    def _module_key(self, structure) -> tuple:
        """What the key holds besides ``signature``: the structure of the call
        (positional or keyword, nesting: ``Flat`` rebuilds the arguments with
        the traced one) and the module state a trace bakes in: which modules
        are lifted, which submodules they hold (a swapped ``nn.ReLU`` has no
        parameter to tell it apart), train/eval of every submodule, its hooks,
        which parameters want gradients, and which tensors the parameters and
        buffers are (the compiled graph keeps the ones it was traced with, so a
        replaced or converted tensor must trace again). Made on every call,
        cheaply: call_key.py."""
        return (("call", structure),) + module_state_key(self._modules(), self.lifted)

    @property
    def reports(self) -> dict[str, dict]:
        if self.fallback is not None:
            return self.fallback.reports
        if self.last is None:   # the last call ran eagerly past recompile_limit, or none yet
            return {"eager": {"eager_fallback": self.eager}} if self.eager else {}
        return self.last.compiler.reports


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
