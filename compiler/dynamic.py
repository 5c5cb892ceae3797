"""Automatic dynamic shapes: after a second size of a dimension, one symbolic program.

Dynamo's ``automatic_dynamic_shapes`` compiles a frame for the sizes of its
first call, and when a dimension shows a second size, compiles once more with
that dimension symbolic; later sizes reuse that program. retrograd does the
same on both faces:

- under ``torch.compile``, dynamo already hands over a graph with symbolic
  sizes (SymInt inputs) after the second size: the backend compiles it once,
  symbolically, inside dynamo's backend call, so the guards the trace adds
  (``s0 >= 2``, ``s0 == s1``) become dynamo's guards;
- on the standalone face, ``SizeHistory`` remembers, per input family (the
  call's signature with sizes left out), which sizes each dimension of each
  contiguous tensor input has taken; once one has taken two, the call is
  traced with fake inputs whose such dimensions are symbols of a fresh
  ``ShapeEnv``, and the program is kept under ``abstract_key`` (the
  signature with those sizes left out) together with the shape guards of its
  trace (``ShapeGuards``), which every later call must pass.

What a symbolic program runs: its joint graph, after dead_gradient (only
the gradients the caller asked for) and cleanup, each kept only where it
needed no guard on the sizes (symbolic_passes.py), is split by retrograd's
checkpoint plan made at the size hints (symbolic_partition.py; the default
partition where that does not apply). Fusion, the memory planner and the
static kernels work on concrete sizes (byte offsets, block sizes, unrolled
index arithmetic), so within each half runs of elementwise ops become
size-generic Triton kernels (symbolic_fusion.py: the element count is a
launch argument) and the rest runs as torch calls. Its report says so
(``symbolic``: the symbolic dimensions, the guards, the executor, the
checkpoint plan; kernels and torch calls counted; in ``passes``, the
graph passes that ran, and offload and CUDA graphs, which never do on a
symbolic program, with the reason).
"""

from __future__ import annotations

import logging
import operator
from collections import Counter
from collections.abc import Sequence
from time import perf_counter
from typing import Any

import torch
from functorch.compile import make_boxed_func
from retrograd import capture, symbolic_partition
from retrograd.capture import _OutputsOwnMemory, signature
from retrograd.decompositions import traced_right
from retrograd.locking import compiling
from retrograd.report import SCHEMA
from retrograd.runtime.device import choose_executor
from retrograd.symbolic_checks import SymbolicDump, Verifier, plan_text
from retrograd.symbolic_fusion import fuse_pointwise
from retrograd.symbolic_passes import cudagraphs_record, offload_record, run_passes
from retrograd.symbolic_peaks import HintProbe, symbolic_peaks
from retrograd.symbolic_runner import ArenaRunner
from torch import fx
from torch._functorch.aot_autograd import aot_module_simplified
from torch._functorch.partitioners import default_partition
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import (
    SYMPY_INTERP,
    DimDynamic,
    ShapeEnv,
    StatelessSymbolicContext,
)

__all__ = ["ShapeGuards", "SizeHistory", "SymbolicCompiler", "abstract_key", "compile_symbolic",
           "describe_dims", "every_dim", "family", "is_symbolic", "symbolic_inputs"]

log = logging.getLogger("retrograd")

#: A dimension of a call: (position of the argument among the call's leaves, dim).
Dim = tuple[int, int]


def _varies(value: Any) -> bool:
    """A tensor whose sizes may be symbolic: dense and contiguous (its strides
    follow from its sizes, so they are left out of the key with them)."""
    return isinstance(value, torch.Tensor) and value.is_contiguous() and value.dim() > 0


def family(leaves: Sequence[Any]) -> tuple:
    """The call's signature with every size of a contiguous tensor left out
    (its rank kept): calls of one family differ only in such sizes."""
    return abstract_key(leaves, {(i, d) for i, v in enumerate(leaves) if _varies(v)
                                 for d in range(v.dim())})


def abstract_key(leaves: Sequence[Any], dims: set[Dim] | frozenset[Dim]) -> tuple:
    """``capture.signature(leaves)`` with the sizes of ``dims`` replaced by
    None, and the strides of those tensors by ``"contiguous"``."""
    key = list(signature(leaves))
    for position, value in enumerate(leaves):
        mine = {d for p, d in dims if p == position}
        if mine and _varies(value):
            shape = tuple(None if d in mine else size for d, size in enumerate(value.shape))
            key[position] = ("tensor", shape, "contiguous") + key[position][3:]
    return tuple(key)


class SizeHistory:
    """The sizes each dimension took, per family of calls (``family``)."""

    def __init__(self):
        self.seen: dict[tuple, dict[Dim, set[int]]] = {}

    def observe(self, leaves: Sequence[Any]) -> frozenset[Dim]:
        """Record this call's sizes; return the dimensions of its family that
        have taken two sizes or more (those to make symbolic)."""
        sizes = self.seen.setdefault(family(leaves), {})
        for position, value in enumerate(leaves):
            if _varies(value):
                for d, size in enumerate(value.shape):
                    taken = sizes.setdefault((position, d), set())
                    if len(taken) < 2:   # two sizes decide; more would only grow
                        taken.add(int(size))
        return frozenset(dim for dim, taken in sizes.items() if len(taken) > 1)


def every_dim(leaves: Sequence[Any]) -> frozenset[Dim]:
    """Every dimension of every contiguous tensor (``dynamic=True``)."""
    return frozenset((i, d) for i, v in enumerate(leaves) if _varies(v) for d in range(v.dim()))


def describe_dims(dims: Sequence[Dim]) -> str:
    """``input 0 dim 0, input 2 dim 1``, as recompile messages name them."""
    return ", ".join(f"input {position} dim {d}" for position, d in sorted(dims))


def symbolic_inputs(leaves: Sequence[Any], slots: Sequence[int], dims: frozenset[Dim]):
    """Fake copies of the tensors at ``slots`` whose ``dims`` are symbols of a
    fresh ShapeEnv (the others static); returns (fakes, shape_env)."""
    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env, allow_non_fake_inputs=True)
    fakes = []
    for slot in slots:
        tensor = leaves[slot]
        mine = {d for p, d in dims if p == slot}
        sizes = [DimDynamic.DYNAMIC if d in mine else DimDynamic.STATIC
                 for d in range(tensor.dim())]
        context = StatelessSymbolicContext(dynamic_sizes=sizes)
        fakes.append(mode.from_tensor(tensor, symbolic_context=context))
    return fakes, env


class ShapeGuards:
    """The shape guards of a symbolic trace (``s0 >= 2``, ``s0 == s1``, a
    size the code fixed): a call runs the program only if they hold."""

    def __init__(self, env: ShapeEnv, fakes: list):
        self.env, self.fakes = env, fakes
        # made and compiled once, after the trace (ShapeEnv.evaluate_guards_for_args
        # makes the text and compiles it on every call: ~1.5 ms); static sizes
        # included: a dimension the trace specialized is checked too
        text = env.produce_guards_expression(fakes, ignore_static=False)
        self.code = compile(text, "<retrograd shape guards>", "eval") if text else None

    def hold(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether the guards hold for ``tensors`` (ShapeEnv.evaluate_guards_expression,
        with the expression compiled once)."""
        if self.code is None:
            return True
        names = {f"t{i}": tensor for i, tensor in enumerate(tensors)}
        return bool(eval(self.code, SYMPY_INTERP, {"L": names}))   # torch's own guard text

    def text(self) -> str:
        return self.env.produce_guards_expression(self.fakes) or "True"


def is_symbolic(example_inputs: Sequence[Any]) -> bool:
    """Whether dynamo handed over symbolic sizes (a SymInt input or size)."""
    for value in example_inputs:
        if isinstance(value, torch.SymInt):
            return True
        if isinstance(value, torch.Tensor) and any(
                isinstance(size, torch.SymInt) for size in value.shape):
            return True
    return False


WHY = ("split by retrograd's checkpoint plan made at the size hints; its memory planner and "
       "static kernels need concrete sizes: elementwise runs are size-generic Triton kernels, "
       "the rest torch calls")
WHY_DEFAULT = ("split by AOTAutograd's default partition; retrograd's memory planner and "
               "static kernels need concrete sizes: elementwise runs are size-generic Triton "
               "kernels, the rest torch calls")


class SymbolicCompiler:
    """AOTAutograd's hooks for a symbolic program: the default partition; in
    each half, runs of elementwise ops become size-generic Triton kernels
    (symbolic_fusion.py) and the rest stays torch calls; and its report."""

    def __init__(self, what: str, dims: str, executor: str = "auto", options=None,
                 module: torch.nn.Module | None = None, gradients=None):
        self.what, self.dims, self.executor = what, dims, executor
        self.options, self.gradients = options, gradients
        self.joint_records: list[dict] = []   # dead_gradient, cleanup (symbolic_passes.py)
        self.verifier = Verifier(what, module) if getattr(options, "verify", False) else None
        self.dump: SymbolicDump | None = None
        self.checkpoint: dict | None = None   # the checkpoint pass's stats, at the hints
        self.runners: dict[str, ArenaRunner | None] = {}   # per half; None: the fx graph runs
        self.reports: dict[str, dict] = {}
        self.closed_over_grads: list[str] = []
        self.guards = "dynamo's guards"
        self.started = perf_counter()

    def set_guards(self, text: str) -> None:
        """The shape guards of the trace, in the reports made and to come."""
        self.guards = text
        for name, report in self.reports.items():
            report["symbolic"]["guards"] = text
            if self.dump is not None:
                self.dump.report(name, report)

    def partition(self, joint: fx.GraphModule, joint_inputs, **kwargs):
        """retrograd's checkpoint plan, made at the size hints
        (symbolic_partition.py); AOTAutograd's default partition where it
        does not apply (``checkpoint=None``: the reason is logged) or where
        the user disabled checkpointing."""
        from retrograd.graph_compiler import _closed_over_grads
        self.closed_over_grads = _closed_over_grads(joint)
        self.dump = SymbolicDump(getattr(self.options, "dump_dir", None), joint,
                                 ["forward", "backward"])
        if self.verifier is not None:   # checked against the joint graph as traced
            self.verifier.set_joint(joint, kwargs["num_fwd_outputs"])
        joint, self.joint_records = run_passes(joint, "joint", self.options, self.what,
                                               kwargs["num_fwd_outputs"], self.gradients)
        split = None
        if self.options is not None:
            split = self._plan(joint, kwargs["num_fwd_outputs"])
        if split is None:
            self.checkpoint = None
            forward, backward = default_partition(joint, joint_inputs, **kwargs)
        else:
            forward, backward, self.checkpoint = split
        self.dump.split(forward, backward)
        return forward, backward

    def _plan(self, joint: fx.GraphModule, num_fwd_outputs: int):
        """symbolic_partition.partition, or None where it raised (the default
        partition then splits the graph: eager's saved values, never a wrong
        one; logged). An error about the user's options is theirs: raised."""
        try:
            return symbolic_partition.partition(joint, num_fwd_outputs, self.options, self.what)
        except Exception as error:   # the default partition is always right
            if getattr(error, "user_error", False):
                raise
            log.warning("retrograd: %s: the checkpoint plan failed on the symbolic program "
                        "(%s: %s); it is split by AOTAutograd's default partition", self.what,
                        type(error).__name__, str(error).splitlines()[0] if str(error) else "")
            return None

    def half(self, name: str):
        def compile_half(gm: fx.GraphModule, example_inputs):
            captured = len(gm.graph.nodes)
            if self.dump is None:   # no joint graph was split: a forward alone
                gm, self.joint_records = run_passes(gm, "inference", self.options, self.what)
            executor = choose_executor(self.executor, _device(gm))
            # the torch program's symbolic form is the graph itself: torch calls, no kernels
            gm, kernels = fuse_pointwise(gm, "fx" if executor == "torch" else executor)
            runner = None if executor == "fx" else ArenaRunner(gm)
            self.runners[name] = runner
            self.reports[name] = report = self._report(name, gm, captured, kernels, executor)
            log.info("retrograd: %s: symbolic %s program (%s): %d size-generic Triton kernels "
                     "+ %d torch calls", self.what, name, self.dims, kernels,
                     report["kernels"]["extern"])
            self._dump(name, gm, report, runner)
            if runner is None:
                runner = make_boxed_func(gm.forward)
            runner._boxed_call = True   # called with the list of inputs, which it may clear
            if self.verifier is None:
                return runner
            runner = HintProbe(runner, gm, self.runners[name], self.checkpoint, report,
                               lambda: self.dump.report(name, report))   # inside verify's check
            if name == "backward":
                tangents = sum(1 for n in gm.graph.nodes if n.op == "placeholder"
                               and n.name.startswith("tangents"))
                return self.verifier.backward(runner, tangents)
            return self.verifier.forward(runner)
        return compile_half

    def _dump(self, name: str, gm: fx.GraphModule, report: dict, runner) -> None:
        """The half's files in the dump (a forward without a joint graph, when
        no gradient is needed, gets a folder of its own)."""
        if self.dump is None:
            self.dump = SymbolicDump(getattr(self.options, "dump_dir", None), gm, [name])
        report["graph_id"] = f"{self.dump.graph_id}-{name}"
        self.dump.half(name, gm, report, plan_text(name, runner))

    def _report(self, name: str, gm: fx.GraphModule, captured: int, kernels: int,
                executor: str) -> dict:
        calls = Counter(str(node.target) for node in gm.graph.nodes
                        if node.op == "call_function" and node.target is not operator.getitem
                        and not isinstance(node.meta.get("val"), torch.SymInt)
                        and not getattr(node.target, "__name__", "").startswith(
                            ("sized_pointwise_", "sized_reduction_", "sized_rows_")))
        return {"schema": SCHEMA, "graph": name, "graph_id": None,
                "nodes": {"captured": captured, "final": len(gm.graph.nodes)},
                "passes": self._passes(executor, len(gm.graph.nodes)),
                "kernels": {"triton": kernels, "extern": sum(calls.values()),
                            "extern_ops": dict(sorted(calls.items())), "views": None,
                            "pointwise_ops": None, "pointwise_ops_in_triton": None,
                            "pointwise_ops_extern": None, "ops_in_triton": None},
                "memory": {"saved_activation_bytes": None, "arena_bytes": None,
                           "live_lower_bound_bytes": None, "unplanned_bytes": None,
                           **symbolic_peaks(gm, self.runners.get(name), self.checkpoint)},
                "traffic": None, "recompute": {"nodes": None, "flops": None},
                "ledger": [], "pareto": None, "communication": None,
                "compile_seconds": round(perf_counter() - self.started, 4),
                "symbolic": {"dims": self.dims, "guards": self.guards, "executor": executor,
                             "why": WHY if self.checkpoint else WHY_DEFAULT,
                             "memory_plan": self._plan_fields(name),
                             **self._checkpoint_fields()}}

    def _passes(self, executor: str, nodes: int) -> list[dict]:
        """The report's pass records: the joint passes that ran (or why not),
        offload (never, and why) and codegen's CUDA-graph decision (never)."""
        return [*self.joint_records, offload_record(self.options, self.what),
                cudagraphs_record(getattr(self.options, "cudagraphs", None), self.dims,
                                  self.what, executor, nodes)]

    def _plan_fields(self, name: str) -> dict | None:
        """What the run-time plan (symbolic_plan.py) may put in arenas; None
        where the fx graph runs as it is (``executor="fx"``)."""
        runner = self.runners.get(name)
        if runner is None:
            return None
        return {"plannable_values": len(runner.planner.values),
                "symbols": [str(symbol) for symbol, _, _ in runner.planner.bindings],
                "arenas": "sized per call from the symbols' values, planned once per size"}

    def _checkpoint_fields(self) -> dict:
        """The checkpoint plan made at the hints (its stats less the ledger and
        trade-off, whose bytes hold at the hints only) and the saved bytes as
        an expression of the symbols; None where the default partition ran."""
        if self.checkpoint is None:
            return {"checkpoint": None, "saved_activation_bytes": None}
        stats = {k: v for k, v in self.checkpoint.items()
                 if k not in ("ledger", "pareto", "saved_activation_bytes_expression")}
        return {"checkpoint": stats,
                "saved_activation_bytes": self.checkpoint["saved_activation_bytes_expression"]}


def _device(gm: fx.GraphModule) -> torch.device:
    """The device of the graph's first tensor input (cpu when it has none)."""
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        if node.op == "placeholder" and isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def compile_symbolic(module: torch.nn.Module, fakes: Sequence[Any], what: str, dims: str,
                     options=None, gradients=None):
    """``module`` traced by AOTAutograd on symbolic ``fakes``; returns
    (callable, compiler). Runs in the fake mode (and, under torch.compile, the
    tracing context) of ``fakes``, so the trace's shape guards land there.
    ``verify`` and ``dump_dir`` (of ``options``): symbolic_checks.py;
    ``gradients`` (dead_gradient.GradientSpec): what the caller needs."""
    wrapped = _OutputsOwnMemory(module)
    compiler = SymbolicCompiler(what, dims, getattr(options, "executor", "auto"), options,
                                wrapped, gradients)
    with compiling(), traced_right():   # the static face's table and fixes (capture.py)
        compiled = aot_module_simplified(
            wrapped, list(fakes),
            fw_compiler=compiler.half("forward"), bw_compiler=compiler.half("backward"),
            inference_compiler=compiler.half("forward"), partition_fn=compiler.partition,
            decompositions=capture.decompositions_for(compiler.executor, fakes))
    return compiled, compiler
