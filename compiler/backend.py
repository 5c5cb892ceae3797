"""The torch.compile face: ``torch.compile(model, backend="retrograd", options={...})``.

Dynamo hands over a GraphModule and example inputs. Compilation waits for
the first real call, for two reasons: ``verify=True`` needs real inputs, and
when dynamo marks shapes dynamic after a recompile (SymInt inputs), the
graph is specialized to the concrete sizes of each call: one compiled graph
per distinct signature, cached. That is a documented specialization
(docs/design.md), not symbolic codegen. At most ``max_programs`` are kept,
least recently used released first (recompiles.py). A graph whose trace
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
from retrograd.errors import DATA_DEPENDENT
from retrograd.locking import compiling
from retrograd.options import Options
from retrograd.recompiles import describe_change, limit_message
from retrograd.torch_logging import register as register_torch_logs

__all__ = ["retrograd_backend", "CompiledGraph"]

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
        self.warned_limit = False
        self.warned_eager = False
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
            if compiled is not None:
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

    def _bound(self, key: tuple) -> None:
        """Release the least recently used programs past ``max_programs`` (the
        new ``key`` is the most recent); warn once naming what changed. Called
        holding ``self.lock``; a thread running a released program holds it
        until its call ends."""
        limit = self.options.max_programs
        if len(self.compiled) <= limit:
            return
        if not self.warned_limit:
            self.warned_limit = True
            others = [other for other in self.compiled if other != key]
            what = f"a graph dynamo handed over ({len(self.gm.graph.nodes)} nodes)"
            warnings.warn(limit_message("torch.compile(backend='retrograd')", what, limit,
                                        describe_change(key, others)), stacklevel=4)
        while len(self.compiled) > limit:
            oldest = next(iter(self.compiled))
            log.info("retrograd: releasing the program of a signature (max_programs=%d)", limit)
            del self.compiled[oldest], self.compilers[oldest]


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
    return CompiledGraph(gm, Options.from_mapping(options))


def register() -> None:
    """Register by name without the entry point (for an uninstalled checkout)."""
    register_torch_logs()
    from torch._dynamo.backends.registry import _BACKENDS, register_backend
    if "retrograd" not in _BACKENDS:
        register_backend(name="retrograd")(retrograd_backend)
