"""compile_step with dynamic sizes: after a batch dimension's second size,
one symbolic step program serves every later size.

As the other faces do (dynamic.py): ``SizeHistory`` remembers, per family
of batches (the step's signature with the batch's sizes left out), the sizes
each dimension of each contiguous batch tensor took; once one has taken two
(``dynamic=None``; from the first call with ``dynamic=True``, never with
``False``), the step is traced once more with those dimensions symbols of a
fresh ``ShapeEnv`` (``make_fx`` on fake inputs of that env, the rest of the
step's inputs static), kept under the signature with those sizes left out,
and run by every later call whose sizes pass the trace's shape guards (a
call they refuse compiles its own static program, as before).

What the symbolic step runs: the traced step graph (forward, backward,
optimizer update in one graph) with fx's dead-code elimination; checkpoints
placed in it by the checkpoint pass's ``rematerialize`` planned at the size
hints (symbolic_remat.py; ``symbolic.checkpoint`` and the ledger in the
report, at the hints); its elementwise runs as size-generic kernels
(symbolic_fusion.py, the Triton executors), in arenas sized at each call
from its sizes (symbolic_plan.py); new parameters and optimizer state
written over the inputs they replace where safe (symbolic_donation.py: the
static step's donation rule; the report's ``memory.updates_in_place``; the
rest are copied back by the step). Of the step's other graph passes,
cleanup runs first (symbolic_passes.py: kept where it needed no guard on
the sizes); offload_step and CUDA graphs do not (their buffers and graphs
are sized at compile time), each said in the report's ``passes``.
``dump_dir`` and ``verify`` as for the other faces' symbolic programs
(symbolic_checks.py: folder ``<id>-step``; verify against the traced step
graph at each size's first call, and its first call at the size hints
measured: symbolic_peaks.py's ``HintProbe``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from time import perf_counter
from typing import Any

import torch
import torch.utils._pytree as pytree
from functorch.compile import make_boxed_func
from retrograd import capture
from retrograd.decompositions import traced_right
from retrograd.dump import subject_text
from retrograd.dynamic import (
    ShapeGuards,
    SizeHistory,
    abstract_key,
    describe_dims,
    every_dim,
    family,
    symbolic_inputs,
)
from retrograd.locking import compiling
from retrograd.provenance import recording
from retrograd.report import SCHEMA
from retrograd.runtime.device import choose_executor
from retrograd.symbolic_checks import StepVerifier, SymbolicDump, plan_text, traced_copy
from retrograd.symbolic_donation import donations
from retrograd.symbolic_fusion import fuse_pointwise
from retrograd.symbolic_passes import cudagraphs_record, offload_record, run_passes
from retrograd.symbolic_peaks import HintProbe, symbolic_peaks
from retrograd.symbolic_remat import place_checkpoints
from retrograd.symbolic_runner import ArenaRunner
from torch.func import functionalize
from torch.fx.experimental.proxy_tensor import make_fx

__all__ = ["DynamicSteps"]

log = logging.getLogger("retrograd")


class _Program:
    """One symbolic step program: its executable, guards and report."""

    def __init__(self, executable, guards: ShapeGuards, report: dict, runner):
        self.executable, self.guards, self.report, self.runner = (executable, guards, report,
                                                                  runner)


class DynamicSteps:
    """A step's symbolic programs, one per family of batch sizes."""

    def __init__(self, options, what: str):
        self.options, self.what = options, what
        self.sizes = SizeHistory()
        self.programs: dict[tuple, list[_Program]] = {}
        self.failed: dict[tuple, str] = {}   # families whose symbolic trace failed: why
        self.last: _Program | None = None
        self.compiles = 0

    @property
    def reports(self) -> dict[str, dict]:
        return {"step": self.last.report} if self.last is not None else {}

    def program(self, key: tuple, offset: int, leaves: Sequence[Any], inputs: list,
                function: Callable[[], Callable], updates: dict[int, int] | None = None):
        """The executable for this call, or None (the static path compiles it).

        ``key`` is the step's static key, whose entries ``offset`` on are the
        batch's ``leaves``; ``inputs`` the step's inputs; ``function()`` the
        step function to trace; ``updates`` output position -> input position
        of each value the step replaces (parameters, optimizer state), written
        over that input where safe (symbolic_donation.py)."""
        dims = self._dims(leaves)
        if not dims or family(leaves) in self.failed:
            return None
        batch = abstract_key(leaves, dims)
        abstract = key[:offset] + batch[:len(leaves)] + key[offset + len(leaves):]
        flat = pytree.tree_flatten(inputs)[0]
        for kept in self.programs.get(abstract, ()):
            if kept.guards.hold([v for v in flat if isinstance(v, torch.Tensor)]):
                self.last = kept
                return kept.executable
        made = self._compile(inputs, flat, offset, leaves, dims, function, updates or {})
        if made is None:
            return None
        self.programs.setdefault(abstract, []).append(made)
        self.last = made
        return made.executable

    def _dims(self, leaves: Sequence[Any]) -> frozenset:
        dynamic = getattr(self.options, "dynamic", None)
        if dynamic is False:
            return frozenset()
        seen = self.sizes.observe(leaves)
        return every_dim(leaves) if dynamic else seen

    def _compile(self, inputs, flat, offset, leaves, dims, function, updates):
        """Trace the step with ``dims`` of the batch symbolic; None (and this
        family static from now on, with a warning) if that trace fails."""
        shown = describe_dims(dims).replace("input", "batch input")
        log.info("retrograd.compile_step: compiling %s again: %s took another size: tracing "
                 "with %s symbolic", self.what, shown, "it" if len(dims) == 1 else "them")
        started = perf_counter()
        try:
            with compiling():
                gm, guards = _trace(function(), inputs, flat, leaves, dims)
                dump = SymbolicDump(getattr(self.options, "dump_dir", None), gm, ["step"])
                traced = traced_copy(gm) if getattr(self.options, "verify", False) else None
                gm, records = run_passes(gm, "step", self.options, self.what)
                seed = [n.name for n in gm.graph.nodes if n.op == "placeholder"][-1]
                checkpoints = place_checkpoints(gm, seed, self.options, self.what)
                dump.dumper.stage("checkpoint", subject_text(gm))
        except Exception as error:   # the static path handles it, or says why
            if getattr(error, "user_error", False):
                raise
            why = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            self.failed[family(leaves)] = why
            log.warning("retrograd.compile_step: %s could not be traced with %s symbolic (%s); "
                        "each size is compiled as its own static program", self.what, shown,
                        why)
            return None
        self.compiles += 1
        executor = choose_executor(getattr(self.options, "executor", "auto"), _device(flat))
        gm, kernels = fuse_pointwise(gm, "fx" if executor == "torch" else executor)
        donation = donations(gm, updates) if executor != "fx" and updates else None
        runner = None if executor == "fx" else ArenaRunner(gm, donation)
        executable = make_boxed_func(gm.forward) if runner is None else runner
        executable._boxed_call = True
        report = _report(gm, kernels, executor, shown, guards.text(), perf_counter() - started,
                         checkpoints, runner)
        report["passes"] = [*records, offload_record(self.options, self.what),
                            cudagraphs_record(getattr(self.options, "cudagraphs", None), shown,
                                              self.what, executor, len(gm.graph.nodes))]
        report["memory"]["updates_in_place"] = len(donation) if donation is not None else 0
        report["memory"]["updates_out_of_place"] = len(updates) - \
            report["memory"]["updates_in_place"]
        report["graph_id"] = f"{dump.graph_id}-step"
        dump.half("step", gm, report, plan_text("step", runner))
        if traced is not None:   # measured at the hints inside verify's check
            executable = HintProbe(executable, gm, runner, checkpoints, report,
                                   lambda: dump.report("step", report))
            verifier = StepVerifier(self.what, traced)
            executable = verifier.wrap(executable)
            executable.verifier = verifier
        return _Program(executable, guards, report, runner)


def _trace(step: Callable, inputs: list, flat: list, leaves: Sequence[Any], dims: frozenset):
    """(graph, shape guards) of ``step`` traced on fakes whose batch ``dims``
    are symbols; every other input is a static fake of the same mode."""
    start = len(flat) - len(leaves) - 1   # the batch leaves, then the seed
    slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    fakes, env = symbolic_inputs(list(leaves), slots, dims)
    mode = fakes[0].fake_mode if fakes else None
    by_position = dict(zip(slots, fakes))
    faked = []
    for position, value in enumerate(flat):
        if start <= position < start + len(leaves) and position - start in by_position:
            faked.append(by_position[position - start])
        elif isinstance(value, torch.Tensor):
            faked.append(mode.from_tensor(value, static_shapes=True))
        else:
            faked.append(value)
    fake_inputs = pytree.tree_unflatten(faked, pytree.tree_flatten(inputs)[1])
    with mode, traced_right():
        gm = make_fx(functionalize(recording(step)),   # every decomposition, any executor
                     decomposition_table=capture.decompositions_for(None, flat),
                     tracing_mode="real")(*fake_inputs)
    # make_fx writes forward() to take the step's inputs nested as passed;
    # every executor calls it with the flat list (the fx executor directly)
    gm.graph.set_codegen(torch.fx.graph.CodeGen())
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm, ShapeGuards(env, [v for v in faked if isinstance(v, torch.Tensor)])


def _device(flat: list) -> torch.device:
    return next((v.device for v in flat if isinstance(v, torch.Tensor)), torch.device("cpu"))


def _report(gm, kernels: int, executor: str, dims: str, guards: str, seconds: float,
            checkpoints: dict, runner) -> dict:
    """The symbolic step's report: what was counted, null for what no pass made
    (the checkpoint plan's figures and the peaks are at the size hints:
    symbolic_peaks.py)."""
    calls = sum(1 for node in gm.graph.nodes if node.op == "call_function")
    plan = {k: v for k, v in checkpoints.items() if k not in ("ledger", "pareto")}
    return {"schema": SCHEMA, "graph": "step", "graph_id": None,
            "nodes": {"captured": None, "final": len(gm.graph.nodes)}, "passes": [],
            "kernels": {"triton": kernels, "extern": calls - kernels},
            "memory": {"saved_activation_bytes": None, "arena_bytes": None,
                       "live_lower_bound_bytes": None, "unplanned_bytes": None,
                       **symbolic_peaks(gm, runner, checkpoints)},
            "ledger": checkpoints.get("ledger", []), "compile_seconds": round(seconds, 4),
            "symbolic": {"dims": dims, "guards": guards, "executor": executor,
                         "checkpoint": plan,
                         "why": "the traced step graph with checkpoints placed at the size "
                                "hints, size-generic kernels, arenas sized per call and "
                                "updates in place"}}
