"""One captured graph through the pipeline: AOTAutograd's hooks.

``GraphCompiler`` holds the hooks for one captured graph: ``partition``
runs the joint stage of ``pipeline.PIPELINE`` (its last pass, checkpoint,
splits the graph in two), ``compile_forward`` / ``compile_backward`` run the
half stage on each half, generate code and hand back an executable;
``compile_inference`` (no gradient needed) and ``compile_step`` (a whole
training step) run their own stage on the one graph, then the half stage.
With ``verify=True`` it checks the numbers after every pass
(``verify.py``); it keeps each half's report and writes the dump.
"""

from __future__ import annotations

import hashlib
import logging
import operator
from time import perf_counter
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from retrograd.codegen import generate_sources
from retrograd.codegen.torch_program import generate_torch_program
from retrograd.codegen.wrapper import generate_program
from retrograd.dump import Dumper, count_nodes, memory_plan_text, subject_text
from retrograd.ir import Program
from retrograd.kernel_tuning import Tuner
from retrograd.options import Options
from retrograd.passes import layout
from retrograd.pipeline import OpSupport, PassContext, PassSpec, Stage, passes_for, run_pass
from retrograd.measured_peak import NOT_RUN, Probe
from retrograd.report import PassRecord, build_report
from retrograd.repro_writer import on_failure
from retrograd.runtime.autograd import boxed
from retrograd.runtime.cudagraphs import with_cudagraphs
from retrograd.runtime.device import choose_executor, device_of
from retrograd.runtime.executor import FxExecutable, GeneratedExecutable
from retrograd.runtime.torch_program import TorchProgramExecutable
from retrograd.torch_logging import memory_log, passes_log
from retrograd.verify import check_joint, compare, run_graph, run_program

__all__ = ["GraphCompiler"]

log = logging.getLogger("retrograd")


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
        self.num_fwd_outputs: int | None = None   # the forward's user outputs; the rest are saved
        self.saved_layouts: dict[str, tuple[int, ...]] = {}   # forward's saved strides, by name
        self.write_reproducer = True          # repro.run_stage turns it off (repro_writer)

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

    def _tied(self, count: int) -> tuple[tuple[int, ...], ...]:
        """Positions of primals that are one tensor wanting a gradient (tied
        weights, lifted once per name), where the joint graph has one primal
        per real input (AOTAutograd keeps duplicates that are not mutated).
        None under ``retrograd.grad``, which reads each position's gradient
        itself rather than through the autograd engine."""
        if self.real_inputs is None or len(self.real_inputs) != count or \
                self.gradients is not None:
            return ()
        groups: dict[int, list[int]] = {}
        for position, value in enumerate(self.real_inputs):
            if isinstance(value, torch.Tensor) and value.requires_grad:
                groups.setdefault(id(value), []).append(position)
        return tuple(tuple(g) for g in groups.values() if len(g) > 1)

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
        with unset_fake_temporarily(), on_failure(
                self, "joint", joint, [*joint_inputs[0], *joint_inputs[1]],
                num_fwd_outputs=kwargs["num_fwd_outputs"], gradients=self.gradients):
            return self._partition(joint, joint_inputs, **kwargs)

    def _partition(self, joint: fx.GraphModule, joint_inputs, **kwargs):
        ctx = self._begin(joint, ["forward", "backward"])
        ctx.num_fwd_outputs = self.num_fwd_outputs = kwargs["num_fwd_outputs"]
        primals_fake, tangents_fake = joint_inputs
        ctx.tied_primals = self._tied(len(primals_fake))
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
            subject = _run(spec, subject, ctx, self.joint_records)
            if isinstance(subject, tuple) and self.options.verify:   # split in two halves
                self._check_halves(subject, primals, tangents, ctx.num_fwd_outputs, reference)
            elif not isinstance(subject, tuple) and self._keeps_values(spec):
                if reference is not None and hasattr(spec.module, "expected_values"):
                    reference = spec.module.expected_values(reference, ctx)
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
        with unset_fake_temporarily(), on_failure(self, "forward", gm, example_inputs):
            return self._compile_half("forward", gm, example_inputs)

    def compile_backward(self, gm: fx.GraphModule, example_inputs):
        for target, value in self.backward_constants.items():   # closed-over tensors stay live
            owner, _, name = target.rpartition(".")
            setattr(gm.get_submodule(owner), name, value)
        with unset_fake_temporarily(), on_failure(self, "backward", gm, example_inputs):
            return self._compile_half("backward", gm, example_inputs)

    def compile_inference(self, gm: fx.GraphModule, example_inputs):
        """No gradient needed: the joint stage is the forward alone."""
        with unset_fake_temporarily(), on_failure(self, "inference", gm, example_inputs):
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
        with unset_fake_temporarily(), on_failure(self, "step", gm, example_inputs, seed=seed,
                                                  updates=self.updates):
            return self._compile_whole(Stage.STEP, gm, example_inputs)

    def _compile_whole(self, stage: Stage, gm: fx.GraphModule, example_inputs):
        """A graph that is not split (inference, or a training step): its own
        graph-level passes, then the program passes."""
        half = "step" if stage == Stage.STEP else "forward"
        ctx = self._begin(gm, [half])
        ctx.seed = self.seed
        if self.options.verify:
            inputs = self._primals(example_inputs)
            if stage == Stage.STEP:   # its checks run updates in place: on copies, not the model
                inputs = [v.clone() if isinstance(v, torch.Tensor) else v for v in inputs]
            self.references[half] = (inputs, run_graph(gm, inputs))
        for spec in passes_for(stage, self.options.disable):
            gm = _run(spec, gm, ctx, self.joint_records)
            if self.options.verify:
                self._check(spec.name, gm, *self.references[half])
        return self._compile_half(half, gm, example_inputs)

    def _compile_half(self, half: str, gm: fx.GraphModule, example_inputs):
        name = f"{self.graph_id}-{half}"
        dumper = self.joint_dumper.fork(name, self.options.dump_dir)
        # the layout pass may lay out saved activations as the backward's convolutions
        # want them; the backward is told the strides they arrive with
        ctx = PassContext(self.options, dumper, OpSupport(), name, updates=self.updates,
                          num_fwd_outputs=self.num_fwd_outputs if half == "forward" else None,
                          input_layouts=self.saved_layouts if half == "backward" else {})
        records = list(self.joint_records)
        reference = self.references.get(half)
        subject: Any = gm
        for spec in passes_for(Stage.HALF, self.options.disable):
            subject = _run(spec, subject, ctx, records)
            self._check_program(spec.name, subject, reference)
        program: Program = subject
        if half == "forward" and self.num_fwd_outputs is not None:
            self.saved_layouts = layout.saved_layouts(program, self.num_fwd_outputs)
        executable, kernels, wrapper = self._generate(program, example_inputs, records)
        measured = NOT_RUN   # verify's run of the program is the one measured
        if reference is not None:
            probe = Probe(executable, reference[0])
            compare("codegen", run_program(probe, reference[0]), reference[1])
            measured = probe.measured
        report = build_report(half, name, program, records, self.captured_nodes,
                              len(gm.graph.nodes), perf_counter() - self.started, measured)
        self.reports[half] = report
        plan = memory_plan_text(program)
        memory_log.debug("%s: memory plan\n%s", name, plan)
        dumper.finish(report, kernels, wrapper, plan, program)
        self._log(report, dumper)
        return boxed(executable)

    def _check_program(self, stage: str, program: Program, reference) -> None:
        if reference is not None:
            compare(stage, run_program(FxExecutable(program), reference[0]), reference[1])

    def _generate(self, program: Program, example_inputs, records: list[PassRecord]):
        start = perf_counter()
        tuner = None   # block sizes are tuned for generated kernels only
        executor = choose_executor(self.options.executor, device_of(example_inputs))
        if executor == "fx":
            kernels, wrapper = {}, generate_program(program)
            executable = FxExecutable(program)
        elif executor == "torch":   # the CPU default: no kernels, one program of torch calls
            kernels, wrapper = {}, generate_torch_program(program)
            executable = TorchProgramExecutable(program, wrapper)
        else:
            interpreted = executor == "interpret"
            tuner = Tuner(self.options.autotune, device_of(example_inputs), interpreted)
            kernels, wrapper = generate_sources(program, interpreted,
                                                tuner.configure if tuner.enabled else None)
            executable = GeneratedExecutable(program, wrapper, kernels, interpreted)
        executable, graphs = with_cudagraphs(executable, program, self.options.cudagraphs,
                                             example_inputs, executor)
        records.append(PassRecord("codegen", round(perf_counter() - start, 6),
                                  count_nodes(program), count_nodes(program),
                                  {"executor": executor, "kernel_sources": len(kernels),
                                   "source_lines": sum(s.count("\n") for s in kernels.values()),
                                   "cudagraphs": graphs,
                                   "autotune": tuner.summary() if tuner else None}))
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


def _run(spec: PassSpec, subject: Any, ctx: PassContext, records: list[PassRecord]) -> Any:
    """One pass, and its line for ``TORCH_LOGS=retrograd_passes``."""
    subject = run_pass(spec.name, spec.run, subject, ctx, records)
    record = records[-1]
    passes_log.debug("%s: pass %s: %d -> %d nodes in %.3fs %s", ctx.graph_name, record.name,
                     record.nodes_before, record.nodes_after, record.seconds, record.stats)
    return subject


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
