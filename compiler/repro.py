"""What a ``repro.py`` runs: rebuild a failing graph and compile it again.

When a compile fails (a pass or codegen raises) or ``verify=True`` finds a
mismatch, ``repro_writer`` leaves a ``repro.py`` that holds the graph as
given to the failing stage (fx's own Python code for it, as a ``Repro``
module), the shape, stride, dtype and device of each input, and the stage:
which ``GraphCompiler`` hook ran it (``joint`` = AOTAutograd's partition,
``forward`` / ``backward`` = one half, ``inference``, ``step`` =
compile_step) with the same options. This module turns that back into an
fx graph (traced, then its nodes renamed to the recorded names and their
``meta["val"]`` filled by fake-tensor propagation, since the passes read
both), makes random inputs of the recorded metadata, runs the stage, and
compares the failure with the recorded one (``failure_signature``), as
torch's ``after_aot`` reproducers do for Inductor.
"""

from __future__ import annotations

import ast
import functools
import inspect
import operator
import re
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

__all__ = ["Input", "Stage", "build", "make_inputs", "run_stage", "failure_signature", "main"]

#: The stages a reproducer can rerun (``GraphCompiler``'s hooks).
STAGES = ("joint", "forward", "backward", "inference", "step")


@dataclass(frozen=True)
class Input:
    """A tensor input's recorded metadata; ``make`` draws a random one like it
    (normal floats, integers in [0, 2), fair booleans: what verify draws)."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: str = "cpu"

    @classmethod
    def like(cls, value: torch.Tensor) -> "Input":
        return cls(tuple(int(s) for s in value.shape), tuple(int(s) for s in value.stride()),
                   value.dtype, str(value.device))

    def make(self) -> torch.Tensor:
        real = torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=self.device)
        if self.dtype.is_floating_point or self.dtype.is_complex:
            return real.normal_()
        if self.dtype == torch.bool:
            return real.bernoulli_(0.5)
        return real.random_(0, 2)


@dataclass
class Stage:
    """Which hook to rerun and with what: the options as a mapping, and the
    hook's own arguments (``num_fwd_outputs`` and the gradient spec for
    ``joint``, the loss cotangent's input position and the in-place updates
    for ``step``)."""

    name: str
    graph_id: str
    options: dict = field(default_factory=dict)
    num_fwd_outputs: int | None = None
    gradients: dict | None = None
    seed: int | None = None
    updates: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in STAGES:
            raise ValueError(f"retrograd repro: unknown stage {self.name!r}; one of {STAGES}")


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}


def graph_of(forward: Callable) -> fx.Graph:
    """The fx graph ``forward``'s source spells, one node per statement, each
    named as its variable (the passes read names: ``tangents_*`` placeholders
    are the backward's inputs). Read from the source, not traced: a trace
    would run ops that take no tensor (``aten.empty``) instead of recording them."""
    function = ast.parse(textwrap.dedent(inspect.getsource(forward))).body[0]
    scope, graph, env = forward.__globals__, fx.Graph(), {}
    for argument in function.args.args[1:]:
        env[argument.arg] = graph.placeholder(argument.arg)
    for statement in function.body:
        if isinstance(statement, ast.Return):
            graph.output(_evaluate(statement.value, scope, env))
            return graph
        if isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Constant) \
                and statement.value.value is None:
            continue   # fx's "x = None" that frees a value
        if not (isinstance(statement, ast.Assign) and len(statement.targets) == 1
                and isinstance(statement.targets[0], ast.Name)):
            raise ValueError(f"retrograd repro: line {statement.lineno} of Repro.forward is not "
                             f"`name = op(...)`")
        name = statement.targets[0].id
        env[name] = graph.create_node(*_node(statement.value, scope, env), name=name)
        if env[name].name != name:
            raise ValueError(f"retrograd repro: cannot name a node {name!r}")
    raise ValueError("retrograd repro: Repro.forward has no return")


def _evaluate(expression: ast.expr, scope: dict, env: dict) -> Any:
    """A Python value; the names of earlier statements evaluate to their nodes."""
    # the reproducer is code its user runs anyway; eval reads its expressions
    return eval(compile(ast.Expression(expression), "<Repro.forward>", "eval"),
                scope, env)


def _node(expression: ast.expr, scope: dict, env: dict) -> tuple:
    """(op, target, args, kwargs) of the node one statement's value spells."""
    value = functools.partial(_evaluate, scope=scope, env=env)
    if isinstance(expression, ast.Call):
        function = expression.func
        args = tuple(value(a) for a in expression.args)
        kwargs = {k.arg: value(k.value) for k in expression.keywords}
        if isinstance(function, ast.Attribute) and isinstance(function.value, ast.Name) \
                and function.value.id in env:   # a method of a value: x.view(...)
            return "call_method", function.attr, (env[function.value.id], *args), kwargs
        return "call_function", value(function), args, kwargs
    if isinstance(expression, ast.Subscript):
        return "call_function", operator.getitem, \
            (value(expression.value), value(expression.slice)), {}
    if isinstance(expression, ast.Attribute) and isinstance(expression.value, ast.Name) \
            and expression.value.id == "self":
        return "get_attr", expression.attr, (), {}
    if isinstance(expression, ast.BinOp) and type(expression.op) in _BINARY:
        return "call_function", _BINARY[type(expression.op)], \
            (value(expression.left), value(expression.right)), {}
    raise ValueError(f"retrograd repro: cannot read line {expression.lineno} of "
                     f"Repro.forward as one node")


def _descriptors(graph: fx.Graph, descriptors: dict[str, str]) -> None:
    """AOTAutograd's input/output descriptors (checkpoint finds the inputs a
    graph mutates from them), rebuilt from their reprs."""
    from torch._functorch._aot_autograd import descriptors as module
    namespace = {"__builtins__": {}, **vars(module)}
    for node in graph.nodes:
        text = descriptors.get("output" if node.op == "output" else node.name)
        if text is not None:
            node.meta["desc"] = eval(text, namespace)   # reprs of torch's descriptors


def make_inputs(inputs: Sequence[Any]) -> list:
    """Random tensors for ``Input`` entries; other entries (numbers) as they are."""
    return [item.make() if isinstance(item, Input) else item for item in inputs]


def build(module_class: type, inputs: Sequence[Any],
          descriptors: dict[str, str] | None = None) -> fx.GraphModule:
    """The fx graph of ``module_class().forward`` with its recorded node names
    and every node's ``meta["val"]`` for inputs of the recorded metadata."""
    torch.manual_seed(0)    # the random stand-ins of large constants
    graph_module = fx.GraphModule(module_class(), graph_of(module_class.forward))
    _descriptors(graph_module.graph, descriptors or {})
    graph_module.recompile()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        fakes = [torch.empty_strided(i.shape, i.stride, dtype=i.dtype, device=i.device)
                 if isinstance(i, Input) else i for i in inputs]
    FakeTensorProp(graph_module, mode).propagate_dont_convert_inputs(*fakes)
    return graph_module


def run_stage(stage: Stage, graph_module: fx.GraphModule, values: Sequence[Any]) -> Any:
    """Run ``stage``'s GraphCompiler hook on ``graph_module`` and ``values``,
    writing no reproducer of its own; returns what the hook returns."""
    from retrograd.dump import Dumper
    from retrograd.graph_compiler import GraphCompiler
    from retrograd.options import Options
    from retrograd.passes.dead_gradient import GradientSpec
    from retrograd.verify import run_graph
    options = Options(**stage.options)
    values = list(values)
    if stage.name == "joint":
        names = [n.name for n in graph_module.graph.nodes if n.op == "placeholder"]
        count = sum(name.startswith("tangents") for name in names)
        primals, tangents = values[:len(values) - count], values[len(values) - count:]
        spec = GradientSpec(**stage.gradients) if stage.gradients is not None else None
        compiler = GraphCompiler(options, primals, gradients=spec)
        compiler.write_reproducer = False
        return compiler.partition(graph_module, (primals, tangents),
                                  num_fwd_outputs=stage.num_fwd_outputs)
    compiler = GraphCompiler(options, values)
    compiler.write_reproducer = False
    if stage.name == "inference":
        return compiler.compile_inference(graph_module, values)
    if stage.name == "step":
        return compiler.compile_step(graph_module, values, seed=stage.seed,
                                     updates={int(k): v for k, v in stage.updates.items()})
    compiler.graph_id = stage.graph_id
    compiler.joint_dumper = Dumper(options.dump_dir, [f"{stage.graph_id}-{stage.name}"])
    compiler.captured_nodes = len(graph_module.graph.nodes)
    if options.verify:
        compiler.references[stage.name] = (values, run_graph(graph_module, values))
    hook = compiler.compile_forward if stage.name == "forward" else compiler.compile_backward
    return hook(graph_module, values)


def _innermost(error: BaseException) -> str:
    """``file.py:function`` of the frame that raised ``error``."""
    frames = inspect.getinnerframes(error.__traceback__, context=0) \
        if error.__traceback__ is not None else []
    if not frames:
        return ""
    frame = frames[-1]
    return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.function}"


def failure_signature(error: BaseException) -> tuple[str, ...]:
    """What "fails the same way" compares: the error's type and where it came
    from (for ``PassError`` the pass and its cause's type; for
    ``VerificationError`` the stage whose numbers changed; else the
    function that raised). Messages are not compared: they hold the graph's
    node names and measured errors, which shrinking changes."""
    kind = type(error).__name__
    if kind == "PassError":
        found = re.search(r"pass '([^']+)' failed", str(error))
        cause = error.__cause__
        return (kind, found.group(1) if found else "",
                type(cause).__name__ if cause is not None else "")
    if kind == "VerificationError":
        return (kind, str(getattr(error, "stage", "")))
    return (kind, _innermost(error))


def fails_as(stage: Stage, graph_module: fx.GraphModule, inputs: Sequence[Any],
             expected: tuple[str, ...]) -> tuple[bool, BaseException | None]:
    """Run the stage on fresh random inputs (seed 0); whether it fails with
    ``expected``'s signature, and the error it raised, if any."""
    torch.manual_seed(0)
    values = make_inputs(inputs)
    try:
        run_stage(stage, graph_module, values)
    except Exception as error:  # noqa: BLE001 - any failure is compared, none is hidden
        return failure_signature(error) == tuple(expected), error
    return False, None


def main(module_class: type, inputs: Sequence[Any], stage: Stage,
         expected: tuple[str, ...], descriptors: dict[str, str] | None = None) -> int:
    """A reproducer's entry point: rebuild, rerun, and let the error propagate
    (after a line saying whether it is the recorded one); 0 when nothing fails."""
    graph_module = build(module_class, inputs, descriptors)
    same, error = fails_as(stage, graph_module, inputs, expected)
    if error is None:
        print(f"retrograd repro: stage {stage.name!r} compiled without error: the recorded "
              f"failure {tuple(expected)} did not reproduce", file=sys.stderr)
        return 0
    got = failure_signature(error)
    print(f"retrograd repro: {'reproduced' if same else 'failed differently'}: {got}"
          + ("" if same else f", recorded {tuple(expected)}"), file=sys.stderr)
    raise error
