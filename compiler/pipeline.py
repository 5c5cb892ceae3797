"""The pass pipeline: ``PIPELINE``, one declared list of every pass and the
stages it runs in, and the instrumentation around each pass (timing, node
counts, lint, dumps, verify, error context).

Every pass is ``run(subject, ctx) -> ir.PassResult(subject, stats)`` (as
torch.fx's ``PassManager`` / ``PassResult``; tinygrad's one linear list of
named rewrites is the model for the list). ``GraphCompiler`` holds
AOTAutograd's hooks for one captured graph: ``partition`` runs the joint
stage (the last of which, checkpoint, splits the graph in two), then
``compile_forward`` / ``compile_backward`` run the half stage on each half
and generate code; ``compile_inference`` (no gradient needed) and
``compile_step`` (a whole training step) run their own stage on the one
graph, then the half stage. ``disable`` is checked against the list
(options.py). Passes stay pure functions; everything around them lives
here, in the manner of MLIR's pass manager instrumentation.
"""

from __future__ import annotations

import enum
import hashlib
import inspect
import logging
import operator
import traceback
from dataclasses import dataclass, field
from time import perf_counter
from types import ModuleType
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
from retrograd.dump import (Dumper, count_nodes, kernel_graph, memory_plan_text, subject_text,
                            timeline)
from retrograd.ir import CodegenSupport, PassResult, Program
from retrograd.options import Options
from retrograd.passes import (buffer_reuse, checkpoint, cleanup, dead_gradient, fusion, layout,
                              schedule)
from retrograd.passes.dead_gradient import GradientSpec
from retrograd.report import PassRecord, build_report
from retrograd.runtime.autograd import boxed
from retrograd.runtime.device import choose_executor, device_of
from retrograd.runtime.executor import FxExecutable, GeneratedExecutable
from retrograd.verify import check_joint, compare, run_graph, run_program

__all__ = ["GraphCompiler", "PassError", "PassSpec", "PIPELINE", "Stage", "OpSupport",
           "PassContext", "pass_names", "required_passes", "passes_for", "run_pass"]

log = logging.getLogger("retrograd")


class PassError(RuntimeError):
    """A pass raised; the message names the pass and graph, the cause is chained."""


class OpSupport:
    """What codegen can lower, told to the passes (``ir.CodegenSupport``;
    passes never import codegen)."""

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
    """What a pass is given beside its subject."""

    options: Options
    dumper: Dumper
    op_support: CodegenSupport
    graph_name: str
    log: logging.Logger = log
    gradients: GradientSpec | None = None   # what the caller needs (dead_gradient)
    num_fwd_outputs: int | None = None      # joint stage: the forward's share of the outputs
    seed: str | None = None                 # step stage: the loss cotangent's placeholder
    updates: dict[int, int] = field(default_factory=dict)   # step: output -> input positions


class Stage(enum.StrEnum):
    """Which graph a pass runs on."""

    JOINT = "joint"          # AOTAutograd's joint forward+backward graph (partition_fn)
    INFERENCE = "inference"  # a forward alone, when no gradient is needed
    STEP = "step"            # compile_step's whole training step, one graph
    HALF = "half"            # each program: forward, backward, inference or step


@dataclass(frozen=True)
class PassSpec:
    """One entry of the pipeline: the name ``disable`` uses, the pass's module
    and function (``run(subject, ctx) -> PassResult``, looked up at each run,
    so a pass patched in its module is the one that runs), the stages it runs
    in, and whether no program can be built without it."""

    name: str
    module: ModuleType
    stages: tuple[Stage, ...]
    function: str = "run"
    required: bool = False

    @property
    def run(self) -> Callable[[Any, PassContext], PassResult]:
        return getattr(self.module, self.function)

    @property
    def contract(self) -> str:
        """The ``Requires:`` and ``Ensures:`` lines of the pass's docstring."""
        doc = inspect.getdoc(self.module) or ""
        items: list[str] = []
        for line in doc.splitlines():
            if line.startswith(("Requires:", "Ensures:")):
                items.append(line.strip())
            elif items and line.startswith("  ") and not items[-1].endswith("\n"):
                items[-1] += " " + line.strip()   # a wrapped continuation line
            elif items:
                items[-1] += "\n"
        return " ".join(item.strip() for item in items)


#: The pipeline, in order: every pass retrograd runs, and where. A stage runs
#: the entries that name it, top to bottom; checkpoint has one entry per
#: stage it runs in (the joint graph is split in two; a step stays one graph).
PIPELINE: tuple[PassSpec, ...] = (
    PassSpec("dead_gradient", dead_gradient, (Stage.JOINT,)),
    PassSpec("cleanup", cleanup, (Stage.JOINT, Stage.INFERENCE, Stage.STEP)),
    PassSpec("checkpoint", checkpoint, (Stage.JOINT,), required=True),
    PassSpec("checkpoint", checkpoint, (Stage.STEP,), "rematerialize", required=True),
    PassSpec("fusion", fusion, (Stage.HALF,), required=True),
    PassSpec("layout", layout, (Stage.HALF,)),
    PassSpec("schedule", schedule, (Stage.HALF,)),
    PassSpec("buffer_reuse", buffer_reuse, (Stage.HALF,)),
)


def pass_names() -> tuple[str, ...]:
    """Every pass a user may name in ``disable``, in pipeline order."""
    return tuple(dict.fromkeys(spec.name for spec in PIPELINE))


def required_passes() -> tuple[str, ...]:
    """Passes without which no program can be built: disabling them is an error."""
    return tuple(dict.fromkeys(spec.name for spec in PIPELINE if spec.required))


def passes_for(stage: Stage, disable: Sequence[str] = ()) -> list[PassSpec]:
    """The passes ``stage`` runs, in order, less the disabled ones."""
    return [spec for spec in PIPELINE if stage in spec.stages
            and (spec.required or spec.name not in disable)]


def run_pass(name: str, function: Callable, subject: Any, ctx: PassContext,
             records: list[PassRecord]) -> Any:
    """Run one pass with timing, lint, a record, a dump, and error context."""
    before = count_nodes(subject)
    start = perf_counter()
    try:
        result = function(subject, ctx)
        if not isinstance(result, PassResult):
            raise TypeError(f"a pass returns ir.PassResult(subject, stats), not "
                            f"{type(result).__name__}")
        new_subject, stats = result
        _lint(new_subject)
    except Exception as exc:
        _reproducer(ctx, name, subject, exc)
        raise PassError(f"retrograd: pass {name!r} failed on graph {ctx.graph_name}: "
                        f"{type(exc).__name__}: {exc}") from exc
    record = PassRecord(name, round(perf_counter() - start, 6), before,
                        count_nodes(new_subject), stats)
    records.append(record)
    log.info("%s: pass %s: %d -> %d nodes in %.3fs %s", ctx.graph_name, name,
             record.nodes_before, record.nodes_after, record.seconds, stats)
    ctx.dumper.stage(name, subject_text(new_subject),
                     ".py" if not isinstance(new_subject, Program) else ".txt")
    return new_subject


def _lint(subject: Any) -> None:
    if isinstance(subject, fx.GraphModule):
        subject.graph.lint()
    elif isinstance(subject, tuple):
        for part in subject:
            _lint(part)
    elif isinstance(subject, Program):
        subject.validate()


def _reproducer(ctx: PassContext, name: str, subject: Any, exc: BaseException) -> None:
    """On failure, leave the failing pass's input graph and the traceback in the dump."""
    text = subject_text(subject) if isinstance(subject, (fx.GraphModule, Program, tuple)) \
        else ""
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
        self.joint_dumper.stage("joint", subject_text(gm))
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
        ctx.num_fwd_outputs = kwargs["num_fwd_outputs"]
        primals_fake, tangents_fake = joint_inputs
        inputs = reference = primals = tangents = None
        if self.options.verify:
            primals, tangents = self._primals(primals_fake), [_real(t) for t in tangents_fake]
            spec = self.gradients   # tangents the caller promised zero are zero in the reference
            tangents = [torch.zeros_like(t) if spec is not None and (
                i in spec.zero_tangents or spec.live_tangents is not None
                and i not in spec.live_tangents) else t for i, t in enumerate(tangents)]
            inputs = primals + tangents
            reference = run_graph(joint, inputs)
            self._check_joint(joint, reference, tangents, ctx.num_fwd_outputs)
        subject = joint
        for spec in passes_for(Stage.JOINT, self.options.disable):
            subject = run_pass(spec.name, spec.run, subject, ctx, self.joint_records)
            if isinstance(subject, tuple) and self.options.verify:   # split in two halves
                self._check_halves(subject, primals, tangents, ctx.num_fwd_outputs, reference)
            elif not isinstance(subject, tuple) and self._keeps_values(spec):
                self._check(spec.name, subject, inputs, reference)
        forward, backward = subject
        # AOTAutograd hands compile_backward a deep copy: keep the constants themselves
        self.backward_constants = {n.target: operator.attrgetter(n.target)(backward)
                                   for n in backward.graph.nodes if n.op == "get_attr"}
        return forward, backward

    def _keeps_values(self, spec: PassSpec) -> bool:
        """Whether verify may compare the graph after ``spec`` with the one before:
        dead_gradient zeroes the gradients the caller declared unwanted."""
        return spec.name != "dead_gradient" or self.gradients is None

    def _check_halves(self, halves, primals: list, tangents: list, count: int,
                      reference: list) -> None:
        """Verify the split: forward then backward give the joint graph's values."""
        forward, backward = halves
        outputs = run_graph(forward, primals)
        backward_inputs = outputs[count:] + tangents
        grads = run_graph(backward, backward_inputs)
        compare("checkpoint", outputs[:count] + grads, reference)
        self.references["forward"] = (primals, outputs)
        self.references["backward"] = (backward_inputs, grads)

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
            return self._compile_whole(Stage.INFERENCE, gm, example_inputs)

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
            return self._compile_whole(Stage.STEP, gm, example_inputs)

    def _compile_whole(self, stage: Stage, gm: fx.GraphModule, example_inputs):
        """A graph that is not split (inference, or a training step): its own
        graph-level passes, then the program passes."""
        half = "step" if stage == Stage.STEP else "forward"
        ctx = self._begin(gm, [half])
        ctx.seed = self.seed
        if self.options.verify:
            inputs = self._primals(example_inputs)
            self.references[half] = (inputs, run_graph(gm, inputs))
        for spec in passes_for(stage, self.options.disable):
            gm = run_pass(spec.name, spec.run, gm, ctx, self.joint_records)
            if self.options.verify:
                self._check(spec.name, gm, *self.references[half])
        return self._compile_half(half, gm, example_inputs)

    def _compile_half(self, half: str, gm: fx.GraphModule, example_inputs):
        name = f"{self.graph_id}-{half}"
        dumper = self.joint_dumper.fork(name, self.options.dump_dir)
        ctx = PassContext(self.options, dumper, OpSupport(), name, updates=self.updates)
        records = list(self.joint_records)
        reference = self.references.get(half)
        subject: Any = gm
        for spec in passes_for(Stage.HALF, self.options.disable):
            subject = run_pass(spec.name, spec.run, subject, ctx, records)
            self._check_program(spec.name, subject, reference)
        program: Program = subject
        executable, kernels, wrapper = self._generate(program, example_inputs, records)
        if reference is not None and not isinstance(executable, FxExecutable):
            compare("codegen", run_program(executable, reference[0]), reference[1])
        report = build_report(half, name, program, records, self.captured_nodes,
                              len(gm.graph.nodes), perf_counter() - self.started)
        self.reports[half] = report
        dumper.finish(report, kernels, wrapper, memory_plan_text(program), timeline(program),
                      kernel_graph(program))
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
                                  count_nodes(program), count_nodes(program),
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
