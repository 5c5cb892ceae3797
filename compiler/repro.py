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
import inspect
import re
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Any, Sequence

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


def forward_names(module_class: type) -> list[str]:
    """The names ``forward`` gives its arguments and each assigned value, in order."""
    source = textwrap.dedent(inspect.getsource(module_class.forward))
    function = ast.parse(source).body[0]
    names = [arg.arg for arg in function.args.args[1:]]
    for statement in function.body:
        if isinstance(statement, ast.Assign) and not (
                isinstance(statement.value, ast.Constant) and statement.value.value is None):
            names += [target.id for target in statement.targets if isinstance(target, ast.Name)]
    return names


def _renamed(graph: fx.Graph, names: Sequence[str]) -> fx.Graph:
    """A copy of the traced graph whose nodes bear the recorded names (the
    passes read some: ``tangents_*`` placeholders are the backward's inputs)."""
    nodes = [node for node in graph.nodes if node.op != "output"]
    if len(nodes) != len(names):
        raise ValueError(f"retrograd repro: the traced graph has {len(nodes)} nodes but "
                         f"Repro.forward names {len(names)}; was it edited into a shape "
                         f"fx cannot trace one statement per node?")
    wanted = dict(zip(nodes, names))
    new, env = fx.Graph(), {}
    for node in graph.nodes:
        env[node] = new.create_node(node.op, node.target, fx.map_arg(node.args, env.get),
                                    fx.map_arg(node.kwargs, env.get),
                                    wanted.get(node, "output"), node.type)
        if node in wanted and env[node].name != wanted[node]:
            raise ValueError(f"retrograd repro: cannot name a node {wanted[node]!r}")
    return new


def _descriptors(graph: fx.Graph, descriptors: dict[str, str]) -> None:
    """AOTAutograd's input/output descriptors (checkpoint finds the inputs a
    graph mutates from them), rebuilt from their reprs."""
    from torch._functorch._aot_autograd import descriptors as module
    namespace = {"__builtins__": {}, **vars(module)}
    for node in graph.nodes:
        text = descriptors.get("output" if node.op == "output" else node.name)
        if text is not None:
            node.meta["desc"] = eval(text, namespace)   # noqa: S307 - our own reprs


def make_inputs(inputs: Sequence[Any]) -> list:
    """Random tensors for ``Input`` entries; other entries (numbers) as they are."""
    return [item.make() if isinstance(item, Input) else item for item in inputs]


def build(module_class: type, inputs: Sequence[Any],
          descriptors: dict[str, str] | None = None) -> fx.GraphModule:
    """The fx graph of ``module_class().forward`` with its recorded node names
    and every node's ``meta["val"]`` for inputs of the recorded metadata."""
    traced = fx.symbolic_trace(module_class())
    graph_module = fx.GraphModule(traced, _renamed(traced.graph, forward_names(module_class)))
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
