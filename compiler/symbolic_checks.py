"""Dumps and ``verify`` for symbolic programs (dynamic shapes).

Dump (``dump_dir``): a symbolic program's graph id is ``s`` and a digest of
its joint graph; its folders ``<id>-forward`` and ``<id>-backward`` hold, in
order, the symbolic joint graph, both halves as the checkpoint plan split
them, each half after the size-generic fusion (``symbolic_fusion``), the
size-generic kernels' sources (``kernels/``), ``memory_plan.txt`` (the
values the run-time plan may put in arenas, their sizes and lifetimes as
expressions of the symbols) and ``report.json`` with its ``symbolic`` part.
There is no ``program.py``, ``trace.json`` or page: those read a static
program's buffers.

Verify (``verify=True``): the first call at each size checks the program
against the call's real inputs. The forward's inputs and outputs are kept
until its backward runs (matched by the storages of the values it saved);
then the joint graph runs on those inputs and the backward's tangents (the
traced aten ops, op by op), eager autograd runs the captured module on them
(``verify.check_joint``: the joint graph against eager), and the forward's
outputs with the backward's gradients must match the joint graph's
(``verify.compare``: checkpoint split, fusion, kernels and arenas at once).
A program that draws random numbers is not checked (the draws differ from
eager's; logged), as the static joint stage skips it. Inside the check, each
half's first call at the size hints is measured for the report's
``measured_peak_bytes`` (symbolic_peaks.py's ``HintProbe``).

compile_step's symbolic step (step_dynamic.py) is one graph, dumped under
``<id>-step`` (the traced step graph as ``joint``, the graph after checkpoint
placement as ``checkpoint``, then as above). Its verify (``StepVerifier``)
runs the traced step graph op by op on a copy of the first call's inputs at
each size (taken before the program writes parameters and state in place)
and compares the loss, new parameters and new state with the program's
(checkpoint placement, fusion, kernels, arenas and in-place updates at
once); as the static step's verify, against the traced graph, not eager.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from typing import Any

import torch
from retrograd.dump import Dumper, subject_text
from retrograd.report import to_json
from retrograd.symbolic_fusion import kernel_sources
from retrograd.verify import check_joint, compare, is_random_graph, run_graph
from torch import fx

__all__ = ["StepVerifier", "SymbolicDump", "Verifier", "plan_text", "traced_copy"]

log = logging.getLogger("retrograd")

#: Forward calls kept for their backward at most (a forward whose backward never runs).
PENDING = 8


class SymbolicDump:
    """The dump folders of one symbolic program (nothing written without ``root``)."""

    def __init__(self, root: str | None, joint: fx.GraphModule, halves: list[str]):
        self.root = root
        self.graph_id = "s" + hashlib.sha1(joint.code.encode()).hexdigest()[:10]
        self.dumper = Dumper(root, [f"{self.graph_id}-{half}" for half in halves])
        self.dumper.stage("joint", subject_text(joint))
        self.dumpers: dict[str, Dumper] = {}

    def split(self, forward: fx.GraphModule, backward: fx.GraphModule) -> None:
        self.dumper.stage("checkpoint", subject_text((forward, backward)))

    def half(self, name: str, gm: fx.GraphModule, report: dict, plan_text: str) -> None:
        """One half's final graph, kernels, plan and report."""
        dumper = self.dumper.fork(f"{self.graph_id}-{name}", self.root)
        dumper.stage("symbolic_fusion", subject_text(gm))
        for kernel, source in kernel_sources(gm).items():
            dumper.write(f"kernels/{kernel}.py", source)
        dumper.write("memory_plan.txt", plan_text)
        self.dumpers[name] = dumper
        self.report(name, report)

    def report(self, name: str, report: dict) -> None:
        """(Re)write the half's report.json (the standalone face learns the
        shape guards after the trace)."""
        self.dumpers[name].write("report.json", to_json(report))


def plan_text(name: str, runner) -> str:
    """memory_plan.txt of a symbolic half: what its arenas may hold, by symbol."""
    if runner is None:
        return f"# {name}: executor='fx' runs the graph as it is: no arena\n"
    planner = runner.planner
    lines = [(f"# run-time memory plan of the symbolic {name}: values an arena may hold "
              "(planned per call size on first sight)"),
             "# symbols: " + ", ".join(f"{symbol} = input {slot}" + (
                 f" dim {dim}" if dim is not None else "")
                 for symbol, slot, dim in planner.bindings),
             f"{'value':32s} {'dtype':10s} {'first':>6s} {'last':>6s} {'over':16s} shape"]
    for value in planner.values.values():
        lines.append(f"{value.node:32s} {str(value.dtype)[6:]:10s} {value.start:6d} "
                     f"{value.end:6d} {value.over or '-':16s} "
                     f"[{', '.join(str(s) for s in value.shape)}]")
    return "\n".join(lines) + "\n"


def _storages(values: list) -> tuple[int, ...]:
    return tuple(sorted(v.untyped_storage().data_ptr() for v in values
                        if isinstance(v, torch.Tensor)))


def _detached(values: list) -> list:
    """Copies that keep the values and which of them want a gradient (eager's
    check differentiates with respect to those)."""
    return [v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor)
            else v for v in values]


class Verifier:
    """Wraps a symbolic program's halves so the first call at each size is
    checked against the joint graph and eager (module docstring)."""

    def __init__(self, what: str, module: torch.nn.Module | None):
        self.what, self.module = what, module
        self.joint: fx.GraphModule | None = None
        self.num_fwd_outputs = 0
        self.seen: set[tuple] = set()
        self.pending: OrderedDict[tuple, list] = OrderedDict()
        self.checked = 0         # calls checked so far (the tests read it)
        self.eager_checked = 0   # of them, those the eager module checked too

    def set_joint(self, joint: fx.GraphModule, num_fwd_outputs: int) -> None:
        self.joint, self.num_fwd_outputs = joint, num_fwd_outputs
        if is_random_graph(joint):
            log.info("retrograd: %s: verify: the symbolic program draws random numbers "
                     "(retrograd's draws are not eager's): not checked", self.what)
            self.joint = None

    def forward(self, run):
        def checked(args: list) -> Any:
            key = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args)
            if self.joint is None or key in self.seen:
                return run(args)
            self.seen.add(key)
            inputs = _detached(list(args))
            outputs = run(args)
            count = self.num_fwd_outputs
            self.pending.setdefault(_storages(list(outputs[count:])), []).append(
                (inputs, _detached(list(outputs[:count]))))
            while len(self.pending) > PENDING:
                self.pending.popitem(last=False)
            return outputs
        checked._boxed_call = True
        return checked

    def backward(self, run, tangents: int):
        def checked(args: list) -> Any:
            key = _storages(list(args)[:len(args) - tangents])
            waiting = self.pending.get(key)
            if not waiting:
                return run(args)
            primals, forward_outputs = waiting.pop(0)
            if not waiting:
                del self.pending[key]
            given = _detached(list(args)[len(args) - tangents:])
            grads = run(args)
            self._check(primals, given, forward_outputs, list(grads))
            return grads
        checked._boxed_call = True
        return checked

    def _check(self, primals: list, tangents: list, forward_outputs: list, grads: list):
        reference = run_graph(self.joint, primals + tangents)
        skipped = check_joint(self.module, primals, self.joint, reference, tangents,
                              self.num_fwd_outputs)
        if skipped is not None:
            log.info("retrograd: %s: verify: the eager check of the symbolic joint graph "
                     "was skipped: %s", self.what, skipped)
        compare("symbolic program", forward_outputs + grads, reference)
        self.checked += 1
        self.eager_checked += skipped is None


def traced_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm``'s graph (nodes and metadata shared by value) that later
    rewrites of ``gm`` (checkpoint copies, fusion) leave as traced."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    copied = fx.GraphModule(gm, graph)
    copied.recompile()
    return copied


class StepVerifier:
    """Wraps the symbolic step program so the first call at each size is
    checked against the traced step graph (module docstring)."""

    def __init__(self, what: str, traced: fx.GraphModule):
        self.what, self.traced = what, traced
        if is_random_graph(traced):
            log.info("retrograd: %s: verify: the symbolic step draws random numbers: not "
                     "checked", what)
            self.traced = None
        self.seen: set[tuple] = set()
        self.checked = 0   # calls checked so far (the tests read it)

    def wrap(self, run):
        def checked(args: list) -> Any:
            key = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args)
            if self.traced is None or key in self.seen:
                return run(args)
            self.seen.add(key)
            inputs = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
            expected = run_graph(self.traced, inputs)
            outputs = run(args)
            compare("symbolic step program", list(outputs), expected)
            self.checked += 1
            return outputs
        checked._boxed_call = True
        return checked
