"""The pass pipeline: one ordered list of passes, and the instrumentation
around each (timing, node counts, lint, dumps, verify, error context).

``GraphCompiler`` holds AOTAutograd's three hooks for one captured graph:
``partition`` runs the joint-level passes (cleanup, checkpoint), then
``compile_forward`` / ``compile_backward`` (or ``compile_inference`` when no
gradient is needed, ``compile_step`` for a whole training step) run fusion,
layout, schedule and buffer_reuse on each half, generate code and hand back
an executable. Passes stay pure functions; everything around
them lives here, in the manner of MLIR's pass manager instrumentation.
"""

from __future__ import annotations

import hashlib
import logging
import operator
import traceback
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from retrograd.codegen import generate_sources
from retrograd.codegen import indexing as codegen_indexing
from retrograd.codegen import ops as codegen_ops
from retrograd.codegen import pooling as codegen_pooling
from retrograd.codegen import reduction as codegen_reduction
from retrograd.codegen import scatter as codegen_scatter
from retrograd.codegen.wrapper import generate_program
from retrograd.dump import Dumper
from retrograd.ir import Program
from retrograd.options import Options
from retrograd.passes import (buffer_reuse, checkpoint, cleanup, dead_gradient, fusion, layout,
                              schedule)
from retrograd.report import PassRecord, build_report
from retrograd.runtime.autograd import boxed
from retrograd.runtime.device import choose_executor, device_of
from retrograd.runtime.executor import FxExecutable, GeneratedExecutable
from retrograd.verify import check_joint, compare, run_graph, run_program

__all__ = ["GraphCompiler", "PassError", "JOINT_PASSES", "HALF_PASSES"]

log = logging.getLogger("retrograd")

#: The pipeline, in order. Joint passes see forward+backward as one graph;
#: half passes see the forward and the backward separately.
JOINT_PASSES = ("dead_gradient", "cleanup", "checkpoint")
HALF_PASSES = ("fusion", "schedule", "buffer_reuse")


class PassError(RuntimeError):
    """A pass raised; the message names the pass and graph, the cause is chained."""


class OpSupport:
    """What codegen can lower, told to the fusion pass (passes never import codegen)."""

    is_fill = staticmethod(codegen_ops.is_fill)
    is_generator = staticmethod(codegen_ops.is_generator)
    reads_shape_only = staticmethod(codegen_ops.reads_shape_only)
    reads_by_index = staticmethod(codegen_indexing.reads_by_index)
    can_scatter = staticmethod(codegen_scatter.can_scatter)
    can_pool = staticmethod(codegen_pooling.can_pool)
    can_reduce = staticmethod(codegen_reduction.can_reduce)
    describe_reduction = staticmethod(codegen_reduction.describe_reduction)

    @staticmethod
    def can_lower(node) -> bool:
        """A pointwise op, or an op reading through computed indices."""
        return codegen_ops.can_lower(node) or codegen_indexing.reads_by_index(node)


@dataclass
class PassContext:
    options: Options
    dumper: Dumper
    op_support: Any
    graph_name: str
    log: logging.Logger = log
    gradients: Any = None   # dead_gradient.GradientSpec: what the caller needs


def _count(subject: Any) -> int:
    if isinstance(subject, fx.GraphModule):
        return len(subject.graph.nodes)
    if isinstance(subject, tuple):
        return sum(_count(part) for part in subject)
    if isinstance(subject, Program):
        return sum(len(kernel.nodes) for kernel in subject.kernels)
    return 0


def _text(subject: Any) -> str:
    if isinstance(subject, fx.GraphModule):
        return subject.print_readable(print_output=False, include_stride=True)
    if isinstance(subject, tuple):
        return "\n\n".join(f"# ---- {label} ----\n{_text(part)}"
                           for label, part in zip(("forward", "backward"), subject))
    return subject.describe()


def _lint(subject: Any) -> None:
    if isinstance(subject, fx.GraphModule):
        subject.graph.lint()
    elif isinstance(subject, tuple):
        for part in subject:
            _lint(part)
    elif isinstance(subject, Program):
        subject.validate()


def run_pass(name: str, function: Callable, subject: Any, ctx: PassContext,
             records: list[PassRecord], *extra, **keywords) -> Any:
    """Run one pass with timing, lint, a record, a dump, and error context."""
    before = _count(subject)
    start = perf_counter()
    try:
        result = function(subject, ctx, *extra, **keywords)
        new_subject, stats = result if isinstance(result, tuple) else (subject, result)
        _lint(new_subject)
    except Exception as exc:
        _reproducer(ctx, name, subject, exc)
        raise PassError(f"retrograd: pass {name!r} failed on graph {ctx.graph_name}: "
                        f"{type(exc).__name__}: {exc}") from exc
    record = PassRecord(name, round(perf_counter() - start, 6), before, _count(new_subject),
                        stats)
    records.append(record)
    log.info("%s: pass %s: %d -> %d nodes in %.3fs %s", ctx.graph_name, name,
             record.nodes_before, record.nodes_after, record.seconds, stats)
    ctx.dumper.stage(name, _text(new_subject), ".py" if not isinstance(new_subject, Program)
                     else ".txt")
    return new_subject


def _reproducer(ctx: PassContext, name: str, subject: Any, exc: BaseException) -> None:
    """On failure, leave the failing pass's input graph and the traceback in the dump."""
    text = _text(subject) if isinstance(subject, (fx.GraphModule, Program, tuple)) else ""
    ctx.dumper.write(f"failed_{name}.txt",
                     f"# input of pass {name!r} that raised\n{text}\n\n"
                     + "".join(traceback.format_exception(exc)))


def _real(fake: Any) -> Any:
    """A random real tensor shaped like ``fake`` (verify, when no real input is known)."""
    if not isinstance(fake, torch.Tensor):
        return fake
    real = torch.empty_strided(fake.shape, fake.stride(), dtype=fake.dtype, device=fake.device)
    if fake.dtype.is_floating_point:
        return real.normal_()
    if fake.dtype == torch.bool:
        return real.bernoulli_(0.5)
    return real.random_(0, 2)


class GraphCompiler:
    """Compiles one captured graph through AOTAutograd's hooks; keeps its reports."""

    def __init__(self, options: Options, real_inputs: Sequence[Any] | None = None,
                 captured_text: str | None = None, gradients=None,
                 module: torch.nn.Module | None = None):
        self.options = options
        self.module = module   # as captured: verify's joint stage runs it in eager
        self.gradients = gradients
        self.real_inputs = list(real_inputs) if real_inputs is not None else None
        self.captured_text = captured_text
        self.reports: dict[str, dict] = {}
        self.graph_id: str | None = None
        self.joint_records: list[PassRecord] = []
        self.joint_dumper: Dumper | None = None
        self.captured_nodes = 0
        self.started = perf_counter()
        self.references: dict[str, tuple[list, list]] = {}
        self.closed_over_grads: list[str] = []
        self.backward_constants: dict[str, Any] = {}
        self.updates: dict[int, int] = {}     # compile_step: output -> input positions
        self.seed: str | None = None          # compile_step: the loss cotangent's placeholder

    # -- the joint stage -------------------------------------------------------
    def _begin(self, gm: fx.GraphModule, halves: list[str]) -> PassContext:
        signature = [str((tuple(n.meta["val"].shape), n.meta["val"].dtype))
                     if isinstance(n.meta.get("val"), torch.Tensor) else "?"
                     for n in gm.graph.nodes if n.op == "placeholder"]
        digest = hashlib.sha1((gm.code + "".join(signature)).encode()).hexdigest()[:10]
        self.graph_id = f"g{digest}"
        root = self.options.dump_dir
        self.joint_dumper = Dumper(root, [f"{self.graph_id}-{half}" for half in halves])
        if self.captured_text is not None:
            self.joint_dumper.stage("captured", self.captured_text)
        self.joint_dumper.stage("joint", _text(gm))
        self.captured_nodes = len(gm.graph.nodes)
        self.closed_over_grads = _closed_over_grads(gm)
        self.started = perf_counter()
        return PassContext(self.options, self.joint_dumper, OpSupport(), self.graph_id,
                           gradients=self.gradients)

    def _primals(self, fakes: Sequence[Any]) -> list:
        if self.real_inputs is not None and len(self.real_inputs) == len(fakes):
            return [r.detach() if isinstance(r, torch.Tensor) else r for r in self.real_inputs]
        return [_real(fake) for fake in fakes]

    def _check_joint(self, joint: fx.GraphModule, reference: list, tangents: list,
                     num_fwd_outputs: int) -> None:
        skipped = check_joint(self.module, self.real_inputs, joint, reference, tangents,
                              num_fwd_outputs)
        if skipped is not None:
            log.info("%s: verify: joint stage skipped: %s", self.graph_id, skipped)

    def _check(self, stage: str, gm: fx.GraphModule, inputs: list, reference: list) -> None:
        if self.options.verify:
            compare(stage, run_graph(gm, inputs), reference)

    def partition(self, joint: fx.GraphModule, joint_inputs, **kwargs):
        """AOTAutograd's partition_fn: joint passes, then the split."""
        # AOTAutograd calls its hooks inside its fake mode; verify runs real tensors.
        with unset_fake_temporarily():
            return self._partition(joint, joint_inputs, **kwargs)

    def _partition(self, joint: fx.GraphModule, joint_inputs, **kwargs):
        ctx = self._begin(joint, ["forward", "backward"])
        primals_fake, tangents_fake = joint_inputs
        inputs = reference = None
        if self.options.verify:
            primals, tangents = self._primals(primals_fake), [_real(t) for t in tangents_fake]
            spec = self.gradients   # tangents the caller promised zero are zero in the reference
            tangents = [torch.zeros_like(t) if spec is not None and (
                i in spec.zero_tangents or spec.live_tangents is not None
                and i not in spec.live_tangents) else t for i, t in enumerate(tangents)]
            inputs = primals + tangents
            reference = run_graph(joint, inputs)
            self._check_joint(joint, reference, tangents, kwargs["num_fwd_outputs"])
        if "dead_gradient" not in self.options.disable:
            run_pass("dead_gradient", dead_gradient.run, joint, ctx, self.joint_records,
                     kwargs["num_fwd_outputs"])
            if self.gradients is None:   # nothing declared unwanted: values must not move
                self._check("dead_gradient", joint, inputs, reference)
        if "cleanup" not in self.options.disable:
            run_pass("cleanup", cleanup.run, joint, ctx, self.joint_records)
            self._check("cleanup", joint, inputs, reference)
        forward, backward = run_pass("checkpoint", checkpoint.run, joint, ctx,
                                     self.joint_records, joint_inputs, **kwargs)
        # AOTAutograd hands compile_backward a deep copy: keep the constants themselves
        self.backward_constants = {n.target: operator.attrgetter(n.target)(backward)
                                   for n in backward.graph.nodes if n.op == "get_attr"}
        if self.options.verify:
            outputs = run_graph(forward, primals)
            count = kwargs["num_fwd_outputs"]
            saved = outputs[count:]
            backward_inputs = saved + tangents
            grads = run_graph(backward, backward_inputs)
            compare("checkpoint", outputs[:count] + grads, reference)
            self.references["forward"] = (primals, outputs)
            self.references["backward"] = (backward_inputs, grads)
        return forward, backward

    # -- each half -------------------------------------------------------------
    def compile_forward(self, gm: fx.GraphModule, example_inputs):
        with unset_fake_temporarily():
            return self._compile_half("forward", gm, example_inputs)

    def compile_backward(self, gm: fx.GraphModule, example_inputs):
        for target, value in self.backward_constants.items():   # closed-over tensors stay live
            owner, _, name = target.rpartition(".")
            setattr(gm.get_submodule(owner), name, value)
        with unset_fake_temporarily():
            return self._compile_half("backward", gm, example_inputs)

    def compile_inference(self, gm: fx.GraphModule, example_inputs):
        """No gradient needed: the joint stage is the forward alone."""
        with unset_fake_temporarily():
            return self._compile_whole("forward", gm, example_inputs)

    def compile_step(self, gm: fx.GraphModule, example_inputs, seed: int,
                     updates: dict[int, int] | None = None):
        """A whole training step (forward, backward, update) as one program.

        ``seed`` is the input position of the loss's cotangent: the checkpoint
        pass plans what crosses from forward to backward around it, inside
        the one graph, then folds it as the constant 1. ``updates`` maps
        output positions to the input positions whose next value they are
        (new parameters and optimizer state): buffer_reuse writes them in
        place where that is safe.
        """
        self.updates = dict(updates or {})
        self.seed = [n.name for n in gm.graph.nodes if n.op == "placeholder"][seed]
        with unset_fake_temporarily():
            return self._compile_whole("step", gm, example_inputs)

    def _compile_whole(self, kind: str, gm: fx.GraphModule, example_inputs):
        ctx = self._begin(gm, [kind])
        if self.options.verify:
            inputs = self._primals(example_inputs)
            self.references[kind] = (inputs, run_graph(gm, inputs))
        if "cleanup" not in self.options.disable:
            run_pass("cleanup", cleanup.run, gm, ctx, self.joint_records)
            if self.options.verify:
                self._check("cleanup", gm, *self.references[kind])
        if kind == "step" and "checkpoint" not in self.options.disable:
            run_pass("checkpoint", checkpoint.rematerialize, gm, ctx, self.joint_records,
                     self.seed)
            if self.options.verify:
                self._check("checkpoint", gm, *self.references[kind])
        return self._compile_half(kind, gm, example_inputs)

    def _compile_half(self, half: str, gm: fx.GraphModule, example_inputs):
        name = f"{self.graph_id}-{half}"
        dumper = self.joint_dumper.fork(name, self.options.dump_dir)
        ctx = PassContext(self.options, dumper, OpSupport(), name)
        records = list(self.joint_records)
        reference = self.references.get(half)
        program = run_pass("fusion", fusion.run, gm, ctx, records)
        program.updates = {program.outputs[out]: program.inputs[into]
                           for out, into in self.updates.items()
                           if isinstance(program.outputs[out], str)}
        self._check_program("fusion", program, reference)
        if "layout" not in self.options.disable:
            run_pass("layout", layout.run, program, ctx, records)
            self._check_program("layout", program, reference)
        if "schedule" not in self.options.disable:
            run_pass("schedule", schedule.run, program, ctx, records)
            self._check_program("schedule", program, reference)
        if "buffer_reuse" not in self.options.disable:
            run_pass("buffer_reuse", buffer_reuse.run, program, ctx, records)
            self._check_program("buffer_reuse", program, reference)
        executable, kernels, wrapper = self._generate(program, example_inputs, records)
        if reference is not None and not isinstance(executable, FxExecutable):
            compare("codegen", run_program(executable, reference[0]), reference[1])
        report = build_report(half, name, program, records, self.captured_nodes,
                              len(gm.graph.nodes), perf_counter() - self.started)
        self.reports[half] = report
        dumper.finish(report, kernels, wrapper, _memory_plan(program), _timeline(program),
                      _kernel_graph(program))
        self._log(report, dumper)
        return boxed(executable)

    def _check_program(self, stage: str, program: Program, reference) -> None:
        if reference is not None:
            compare(stage, run_program(FxExecutable(program), reference[0]), reference[1])

    def _generate(self, program: Program, example_inputs, records: list[PassRecord]):
        start = perf_counter()
        executor = choose_executor(self.options.executor, device_of(example_inputs))
        if executor == "fx":
            kernels, wrapper = {}, generate_program(program)
            executable = FxExecutable(program)
        else:
            interpreted = executor == "interpret"
            kernels, wrapper = generate_sources(program, interpreted)
            executable = GeneratedExecutable(program, wrapper, kernels, interpreted)
        records.append(PassRecord("codegen", round(perf_counter() - start, 6),
                                  _count(program), _count(program),
                                  {"executor": executor, "kernel_sources": len(kernels),
                                   "source_lines": sum(s.count("\n") for s in kernels.values())}))
        return executable, kernels, wrapper

    def _log(self, report: dict, dumper: Dumper) -> None:
        kernels, memory = report["kernels"], report["memory"]
        where = f"; dump in {dumper.folders[0]}" if dumper.enabled else ""
        log.info("%s: %d nodes -> %d Triton kernels + %d extern calls %s; saved activations "
                 "%s bytes, live lower bound %s bytes, unplanned %s bytes; %.2fs%s",
                 report["graph_id"], report["nodes"]["final"], kernels["triton"],
                 kernels["extern"], kernels["extern_ops"], memory["saved_activation_bytes"],
                 memory["live_lower_bound_bytes"], memory["unplanned_bytes"],
                 report["compile_seconds"], where)


def _closed_over_grads(gm: fx.GraphModule) -> list[str]:
    """The graph's constants that require grad, once each, with shape and dtype.

    They are real tensors the traced code closed over; AOTAutograd bakes them
    in, so their gradients would be lost.
    """
    found: dict[str, str] = {}
    for node in gm.graph.nodes:
        value = getattr(gm, node.target) if node.op == "get_attr" else None
        if getattr(value, "requires_grad", False):
            found[node.target] = f"{node.target}: {tuple(value.shape)} {value.dtype}"
    return list(found.values())


def _memory_plan(program: Program) -> str:
    lines = [f"# memory plan of {program.name}: buffer, role, bytes, first use, last use, "
             "arena, offset",
             f"{'buffer':32s} {'role':10s} {'bytes':>12s} {'first':>6s} {'last':>6s} "
             f"{'arena':>5s} offset"]
    for buffer in program.buffers.values():
        lines.append(f"{buffer.name:32s} {buffer.role:10s} {buffer.nbytes:12d} "
                     f"{str(buffer.first_use):>6s} {str(buffer.last_use):>6s} "
                     f"{str(buffer.arena):>5s} {buffer.offset}")
    lines.append("")
    lines.append("# arenas: one per window of the schedule (kernels start..stop), "
                 "taken before start and given back after stop")
    for number, window in enumerate(program.arenas):
        lines.append(f"# arena {number}: kernels {window.start}..{window.stop}, "
                     f"{window.nbytes} bytes, {window.strategy}")
    return "\n".join(lines) + "\n"


def _kernel_graph(program: Program) -> list[tuple[str, str, list[int]]]:
    """(name, kind, producer indices) per launched kernel: the dump's program
    picture. Views move no data, so they are left out and read through."""
    launched = [k for k in program.kernels if k.kind != "view"]
    producer = {name: i for i, k in enumerate(launched) for name in k.outputs}
    return [(k.name, k.kind, sorted({producer[program.root(n)] for n in k.inputs
                                     if program.root(n) in producer}))
            for k in launched]


def _timeline(program: Program) -> dict[str, list[int]]:
    """Bytes at each kernel for the dump's memory picture: temporaries alive,
    arenas held, and the footprint buffer_reuse predicted for the whole program."""
    spans = buffer_reuse.lifetimes(program)
    live = [sum(program.buffers[n].nbytes for n, (a, b) in spans.items()
                if n in program.buffers and program.buffers[n].role == "temporary"
                and a <= index <= b) for index in range(len(program.kernels))]
    if not program.arenas:
        return {"live temporaries": live}
    held, predicted = buffer_reuse.footprint(program, spans)
    return {"live temporaries": live, "arenas held": held,
            "predicted footprint (all values, extern scratch)": predicted}