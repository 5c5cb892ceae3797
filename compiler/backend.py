"""The torch.compile face: ``torch.compile(model, backend="retrograd", options={...})``.

Dynamo hands over a GraphModule and example inputs. A graph of static
sizes is compiled at its first real call (``verify=True`` needs real
inputs), once per call signature (Python numbers read through ``.item()``
are baked in). When dynamo marks sizes dynamic after a second size
(automatic dynamic shapes; SymInt inputs), the graph is compiled once,
symbolically, inside this backend call, so the shape guards of the trace
become dynamo's (``SymbolicGraph``, dynamic.py); with ``dynamic=False`` it is
specialized per concrete size instead. At most ``max_programs`` are kept,
least recently used released first, each compile after the first is logged
with what changed, and past ``recompile_limit`` compiles the graph runs in
eager PyTorch (recompiles.py). A graph whose trace
needs tensor values inside an op (a boolean-mask ``index_put``) runs in
eager PyTorch, with a warning and a report that says so (``EagerGraph``).
"""

from __future__ import annotations

import copy
import logging
import threading
import warnings
from collections import Counter, OrderedDict
from typing import Any

import torch

from retrograd.capture import compile_graph, signature
from retrograd.dynamic import compile_symbolic, describe_dims, is_symbolic
from retrograd.errors import DATA_DEPENDENT
from retrograd.locking import compiling
from retrograd.options import Options
from retrograd.recompiles import ProgramBound, describe_change, recompile_limit_message
from retrograd.torch_logging import register as register_torch_logs

__all__ = ["retrograd_backend", "CompiledGraph", "SymbolicGraph"]

log = logging.getLogger("retrograd")

#: torch.compile's ``mode=`` values; retrograd has one mode and says so.
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class CompiledGraph:
    """Dynamo's graph, compiled per call signature on first use."""

    def __init__(self, gm: torch.fx.GraphModule, options: Options):
        self.gm = gm
        self.options = options
        # per signature, least recently used first; at most options.max_programs
        self.compiled: OrderedDict[tuple, Any] = OrderedDict()
        self.compilers: OrderedDict[tuple, Any] = OrderedDict()
        self.lock = threading.Lock()   # the two dicts, for threads sharing this graph
        self.last_key: tuple | None = None
        self.scalar_inputs = scalar_inputs(gm)
        self.bound = ProgramBound("torch.compile(backend='retrograd')")
        self.warned_eager = False
        self.compiles = 0
        self.eager: str | None = None   # past recompile_limit: why new signatures run eagerly
        # dynamo's compile context of this graph (compile id): the lazy compile
        # re-enters it so TORCH_TRACE files retrograd's artifacts under that id
        self.compile_context = torch._guards.CompileContext.try_get()

    @property
    def reports(self) -> dict[str, dict]:
        """Forward and backward reports of the last signature called."""
        with self.lock:
            compiler = self.compilers.get(self.last_key)
        return {} if compiler is None else compiler.reports

    def __call__(self, *args):
        scalars = {index: args[index].item() for index in self.scalar_inputs}
        key = signature(args) + tuple(sorted(scalars.items()))
        compiled = self._use(key)
        if compiled is None:
            compiled = self._compile(key, args, scalars)
        if compiled is None:   # past recompile_limit
            return self.gm(*args)
        return compiled(*args)

    def _use(self, key: tuple) -> Any:
        """The program of ``key`` if kept (now the most recently used), else None."""
        with self.lock:
            compiled = self.compiled.get(key)
            if compiled is not None:
                self.compiled.move_to_end(key)
                self.compilers.move_to_end(key)
                self.last_key = key
            return compiled

    def _compile(self, key: tuple, args, scalars: dict) -> Any:
        """Compile the program of ``key`` and keep it. ``key`` is looked up again
        under the compile lock: threads making the first call of a signature
        together wait for one compile and all use it."""
        with compiling(), torch._guards.compile_context(self.compile_context):
            compiled = self._use(key)
            if compiled is not None or self._past_limit(key):
                return compiled
            concrete = [int(a) if isinstance(a, torch.SymInt) else a for a in args]
            gm = bake_scalars(self.gm, scalars) if scalars else self.gm
            try:
                compiled, compiler = compile_graph(
                    gm, concrete, self.options,
                    captured_text=gm.print_readable(print_output=False))
            except DATA_DEPENDENT as error:   # this graph runs in eager, and says so
                compiled = compiler = EagerGraph(gm, error)
                if not self.warned_eager:
                    self.warned_eager = True
                    log.info(compiled.reason)
                    warnings.warn(compiled.reason, stacklevel=3)
            with self.lock:
                self.compiled[key], self.compilers[key] = compiled, compiler
                self.last_key = key
                self._bound(key)
            return compiled

    def _past_limit(self, key: tuple) -> bool:
        """Count this compile and log what made it; or, past ``recompile_limit``
        compiles, warn once and say the call runs eagerly (the kept programs
        still run)."""
        limit = self.options.recompile_limit
        with self.lock:
            change = describe_change(key, list(self.compiled))
        if limit is not None and self.compiles >= limit:
            if self.eager is None:
                what = f"a graph dynamo handed over ({len(self.gm.graph.nodes)} nodes)"
                self.eager = recompile_limit_message("torch.compile(backend='retrograd')",
                                                     what, limit, change)
                log.warning(self.eager)
                warnings.warn(self.eager, stacklevel=4)
            return True
        self.compiles += 1
        if self.compiles > 1:
            log.info("retrograd: compiling a graph dynamo handed over again (compile %d): %s",
                     self.compiles, change)
        return False

    def _bound(self, key: tuple) -> None:
        """Release the least recently used programs past ``max_programs`` (the
        new ``key`` is the most recent; recompiles.ProgramBound). Called
        holding ``self.lock``; a thread running a released program holds it
        until its call ends."""
        def release_oldest():
            oldest = next(iter(self.compiled))
            del self.compiled[oldest], self.compilers[oldest]
        what = f"a graph dynamo handed over ({len(self.gm.graph.nodes)} nodes)"
        self.bound.enforce(key, self.compiled, self.options.max_programs,
                           lambda: len(self.compiled), release_oldest, what, stacklevel=4)


class EagerGraph:
    """A graph dynamo handed over that retrograd cannot trace with static
    shapes: an op inside it (a boolean-mask index, ``put`` at a 0-dim index)
    has an ATen decomposition that reads tensor values (``nonzero``,
    ``unique``, ``.item()``). Dynamo splits the program at such code only
    where it sees it in Python, not inside an op. The graph then runs as
    it is, in eager PyTorch with autograd, and its report says so: every
    node an extern torch call, no Triton kernel."""

    def __init__(self, gm: torch.fx.GraphModule, error: BaseException):
        self.gm = gm
        op = getattr(error, "func", None) or type(error).__name__
        calls = Counter(str(node.target) for node in gm.graph.nodes
                        if node.op in ("call_function", "call_method", "call_module"))
        self.reason = (f"retrograd (torch.compile face): a graph dynamo handed over "
                       f"({len(gm.graph.nodes)} nodes) reaches {op}, whose result depends on "
                       f"tensor values; retrograd compiles static shapes, so this graph runs "
                       f"in eager PyTorch, uncompiled (its report says so). Index with "
                       f"integer tensors instead of boolean masks to have it compiled")
        self.reports = {"eager": {
            "eager_fallback": self.reason, "graph_id": None,
            "nodes": {"captured": len(gm.graph.nodes), "final": len(gm.graph.nodes)},
            "kernels": {"triton": 0, "extern": sum(calls.values()),
                        "extern_ops": dict(sorted(calls.items()))}}}

    def __call__(self, *args):
        return self.gm(*args)


class SymbolicGraph:
    """A graph dynamo handed over with symbolic sizes, compiled once for all
    of them (dynamic.py says what such a program runs)."""

    def __init__(self, gm: torch.fx.GraphModule, example_inputs, dims: str,
                 options: Options | None = None):
        self.gm = gm
        self.compiled, self.compiler = compile_symbolic(
            gm, example_inputs, "torch.compile(backend='retrograd')", dims, options)

    @property
    def reports(self) -> dict[str, dict]:
        return self.compiler.reports

    def __call__(self, *args):
        return self.compiled(*args)


def symbolic_dims(gm: torch.fx.GraphModule, example_inputs) -> str:
    """The symbolic sizes dynamo handed over, as ``input 0 dim 0`` (and SymInts):
    read from the placeholders' fake values (the example tensors are real)."""
    values = [node.meta.get("example_value", value) for node, value in zip(
        [node for node in gm.graph.nodes if node.op == "placeholder"], example_inputs)]
    return _named_dims(values)


def _named_dims(example_inputs) -> str:
    dims = [(i, d) for i, value in enumerate(example_inputs) if isinstance(value, torch.Tensor)
            for d, size in enumerate(value.shape) if isinstance(size, torch.SymInt)]
    ints = [i for i, value in enumerate(example_inputs) if isinstance(value, torch.SymInt)]
    return ", ".join(filter(None, [describe_dims(dims)] + [f"input {i}" for i in ints]))


def _symbolic_or_none(gm: torch.fx.GraphModule, example_inputs,
                      options: Options) -> SymbolicGraph | None:
    """A ``SymbolicGraph`` where dynamo handed over symbolic sizes (and
    ``dynamic`` is not False, and no Python number is read through ``.item()``);
    None where the graph is compiled per concrete signature instead (logged
    when the symbolic trace failed)."""
    if options.dynamic is False or not is_symbolic(example_inputs) or scalar_inputs(gm):
        return None
    dims = symbolic_dims(gm, example_inputs)
    try:
        return SymbolicGraph(gm, example_inputs, dims, options)
    except Exception as error:   # noqa: BLE001 - the per-size path handles it, or says why
        log.warning("retrograd: a graph dynamo handed over with symbolic sizes (%s) could not "
                    "be traced symbolically (%s: %s); it is compiled per concrete size",
                    dims, type(error).__name__, str(error).splitlines()[0] if str(error)
                    else "")
        return None


def scalar_inputs(gm: torch.fx.GraphModule) -> list[int]:
    """Positions of the inputs that carry a Python number.

    After a recompile dynamo may pass a float argument as a 0-dim tensor that
    the graph reads only through ``.item()``; traced with static shapes that
    read is data-dependent and fails. Those inputs are specialized instead.
    """
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    return [index for index, node in enumerate(placeholders) if node.users and all(
        user.op == "call_method" and user.target == "item" for user in node.users)]


def bake_scalars(gm: torch.fx.GraphModule, values: dict[int, Any]) -> torch.fx.GraphModule:
    """A copy of ``gm`` where ``.item()`` of those inputs is their value (inputs kept)."""
    graph = copy.deepcopy(gm.graph)
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    for index, value in values.items():
        for item in list(placeholders[index].users):
            for user in list(item.users):
                user.args = torch.fx.node.map_arg(user.args, lambda n: value if n is item else n)
                user.kwargs = torch.fx.node.map_arg(user.kwargs,
                                                    lambda n: value if n is item else n)
            graph.erase_node(item)
    return torch.fx.GraphModule(gm, graph)


def retrograd_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None,
                      mode: str | None = None, **unknown):
    """The backend function dynamo calls; registered as ``"retrograd"``."""
    if unknown:
        raise ValueError(f"retrograd: unexpected backend argument(s) {sorted(unknown)}; "
                         f"pass compiler options as options={{...}} "
                         f"(known: {', '.join(Options.known())})")
    if mode not in MODES:
        raise ValueError(f"retrograd: unknown mode {mode!r}; torch.compile's modes are {MODES}")
    if mode not in (None, "default"):
        log.warning("retrograd: mode=%r has no effect; retrograd has a single mode", mode)
    parsed = Options.from_mapping(options)
    return _symbolic_or_none(gm, example_inputs, parsed) or CompiledGraph(gm, parsed)


def register() -> None:
    """Register by name without the entry point (for an uninstalled checkout)."""
    register_torch_logs()
    from torch._dynamo.backends.registry import _BACKENDS, register_backend
    if "retrograd" not in _BACKENDS:
        register_backend(name="retrograd")(retrograd_backend)
