"""Write ``repro.py`` when a compile fails or verify finds a mismatch.

``GraphCompiler`` runs each of its hooks (joint, forward, backward,
inference, step) inside ``on_failure``: a copy of the graph as given to
the stage is taken first (the passes rewrite it in place), and when the
stage raises, ``repro.py`` is written into the graph's dump folder, or a
fresh temporary folder when no ``dump_dir`` is set, and the error's
message names it. The file is the graph as fx's Python code (a ``Repro``
module whose ``forward`` is the graph, constants as literals when small,
else random stand-ins of their metadata), each input's shape, stride,
dtype and device, the stage with its options, and the failure's
signature; running it rebuilds the graph and reruns the stage
(``repro.main``). ``retrograd minify`` shrinks it (``minify.py``).

No reproducer for verify's ``joint`` stage (it compares with eager
autograd on the user's module, which a reproducer does not have), or for
graphs holding submodules (higher-order ops). Writing one never hides the
original error: a failure to write is a warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import operator
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.fx as fx
from retrograd import repro
from retrograd.dump import Dumper
from torch._subclasses.fake_tensor import is_fake

__all__ = ["Snapshot", "snapshot", "repro_source", "on_failure"]

log = logging.getLogger("retrograd")

#: Constants up to this many elements are written out; larger ones are random.
LITERAL_LIMIT = 64


class Unreproducible(Exception):
    """The graph holds something a reproducer cannot write down."""


@dataclasses.dataclass
class Snapshot:
    """A stage's input, recorded before its passes run."""

    stage: repro.Stage
    graph: fx.Graph | list[tuple]        # a graph, or ``record``'s list of its nodes
    constants: dict[str, Any]
    inputs: list


def record(graph: fx.Graph) -> list[tuple]:
    """Each node's fields as they are now: passes replace a node's ``args``
    tuple (fx's argument containers are immutable) rather than edit it, so
    this is a snapshot at a few microseconds a node; ``replay`` builds the
    graph only when a reproducer is written."""
    return [(n, n.op, n.target, n.args, n.kwargs, n.name, n.type, dict(n.meta))
            for n in graph.nodes]


def replay(records: list[tuple]) -> fx.Graph:
    new, env = fx.Graph(), {}
    for node, op, target, args, kwargs, name, type_expr, meta in records:
        env[node] = new.create_node(op, target, fx.map_arg(args, env.__getitem__),
                                    fx.map_arg(kwargs, env.__getitem__), name, type_expr)
        env[node].meta = meta
    return new


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A node-for-node copy (same names, targets, arguments, a copy of each
    ``meta``) with plain flat-argument code generation."""
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        env[node] = new.node_copy(node, lambda n: env[n])
    return new


def snapshot(stage: repro.Stage, graph_module: fx.GraphModule,
             inputs: Sequence[Any]) -> Snapshot:
    constants = {node.target: operator.attrgetter(node.target)(graph_module)
                 for node in graph_module.graph.nodes if node.op == "get_attr"}
    return Snapshot(stage, record(graph_module.graph), constants, list(inputs))


def _input_text(value: Any) -> str:
    if isinstance(value, torch.SymInt) or isinstance(value, torch.Tensor) and any(
            isinstance(size, torch.SymInt) for size in (*value.shape, *value.stride())):
        raise Unreproducible("symbolic sizes, which reproducers do not record")
    if isinstance(value, (torch.Tensor, repro.Input)):
        spec = value if isinstance(value, repro.Input) else repro.Input.like(value)
        return f"repro.Input({spec.shape}, {spec.stride}, {spec.dtype}, {spec.device!r})"
    if isinstance(value, (bool, int, float)) or value is None:
        return repr(value)
    raise Unreproducible(f"an input of type {type(value).__name__}")


def _constant_text(value: Any) -> str:
    if not isinstance(value, torch.Tensor):
        raise Unreproducible(f"a constant of type {type(value).__name__} (a submodule of a "
                             f"higher-order op?)")
    if not is_fake(value) and value.numel() <= LITERAL_LIMIT and not value.is_complex():
        return (f"torch.tensor({value.detach().cpu().tolist()!r}, dtype={value.dtype}, "
                f"device={str(value.device)!r})")
    return f"{_input_text(value)}.make()"


def _globals_text(names: dict[str, Any]) -> list[str]:
    """Import lines for the names fx's generated code uses."""
    lines = []
    for name, value in names.items():
        if name in ("torch", "inf", "nan", "NoneType", "device", "fx_pytree", "pytree"):
            continue
        module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", "")
        if value is operator or name == "operator":
            lines.append("import operator")
        elif module and qualname and "." not in qualname and "<" not in qualname:
            lines.append(f"from {module} import {qualname} as {name}")
        else:
            raise Unreproducible(f"the name {name!r} in the graph's code")
    return lines


def graph_code(graph: fx.Graph, constants: dict[str, Any]) -> tuple[str, list[str], list[str]]:
    """``forward``'s source (fx's code for ``graph``, constants renamed to flat
    attributes), the ``__init__`` lines that set the constants, and imports."""
    graph = copy_graph(graph)
    init, renamed = [], {}
    for node in graph.nodes:
        if node.op == "call_module":
            raise Unreproducible(f"a call of the submodule {node.target!r}")
        if node.op == "get_attr":
            if node.target not in renamed:
                renamed[node.target] = f"constant_{len(renamed)}"
                text = _constant_text(constants[node.target])
                if text.endswith(".make()"):
                    init.append(f"# {node.target}: random, shaped like the constant")
                init.append(f"self.register_buffer({renamed[node.target]!r}, {text})")
            node.target = renamed[node.target]
    code = graph.python_code(root_module="self")
    source = re.sub(r";  (\w+ = )+None$", "", code.src.strip(), flags=re.M)
    return source, init, _globals_text(code.globals)


def _descriptors(graph: fx.Graph) -> dict[str, str]:
    """AOTAutograd's descriptors of the inputs and outputs, as reprs that
    evaluate back to equal objects (those that do not are left out)."""
    from torch._functorch._aot_autograd import descriptors as module
    namespace = {"__builtins__": {}, **vars(module)}
    found = {}
    for node in graph.nodes:
        desc = node.meta.get("desc")
        if desc is None or node.op not in ("placeholder", "output"):
            continue
        try:
            if eval(repr(desc), namespace) == desc:   # a repr we just made
                found["output" if node.op == "output" else node.name] = repr(desc)
        except Exception:  # noqa: BLE001 - a descriptor whose repr does not evaluate
            continue
    return found


_TEMPLATE = '''"""retrograd reproducer: the {stage} stage of graph {graph_id} ({nodes} nodes) fails.

Rebuilds the graph as given to that stage, with random inputs of the recorded
shapes, strides, dtypes and devices, and compiles it again with the same
options, without the model. Run it: `python {file}`. Shrink it:
`retrograd minify {file}` (writes {stem}_minified.py). Written by retrograd
{version} with torch {torch_version}.
"""
{message}
import torch
from math import inf, nan
from torch import device
{imports}
from retrograd import repro

NoneType = type(None)


class Repro(torch.nn.Module):
    def __init__(self):
        super().__init__()
{init}

{forward}


INPUTS = [
{inputs}
]

STAGE = {stage_text}

DESCRIPTORS = {descriptors!r}

EXPECTED = {expected!r}

if __name__ == "__main__":
    raise SystemExit(repro.main(Repro, INPUTS, STAGE, EXPECTED, DESCRIPTORS))
'''


def repro_source(taken: Snapshot, message: str, expected: tuple[str, ...],
                 file_name: str = "repro.py") -> str:
    """The text of ``repro.py`` for ``taken``, failing with ``expected``."""
    from retrograd import __version__
    forward, init, imports = graph_code(taken.graph, taken.constants)
    names = [n.name for n in taken.graph.nodes if n.op == "placeholder"]
    if len(names) != len(taken.inputs):
        raise Unreproducible(f"{len(taken.inputs)} inputs for {len(names)} placeholders")
    inputs = [f"    {_input_text(value)},  # {name}" for name, value in zip(names, taken.inputs)]
    comment = "".join(f"# {line}\n" for line in message.splitlines()[:40])
    return _TEMPLATE.format(
        stage=taken.stage.name, graph_id=taken.stage.graph_id, nodes=len(taken.graph.nodes),
        version=__version__, torch_version=torch.__version__, file=file_name,
        stem=file_name.removesuffix(".py"),
        message=f"\n# The failure when it was written:\n{comment}" if comment else "",
        imports="\n".join(imports), init="\n".join(f"        {line}" for line in init)
        or "        pass", forward=_indent(forward), inputs="\n".join(inputs),
        stage_text=_stage_text(taken.stage), descriptors=_descriptors(taken.graph),
        expected=tuple(expected))


def _stage_text(stage: repro.Stage) -> str:
    """``repro.Stage(...)``, one field a line, the options one a line."""
    options = "".join(f"        {key!r}: {value!r},\n" for key, value in stage.options.items())
    fields = [f"    {f.name}={getattr(stage, f.name)!r}," for f in dataclasses.fields(stage)
              if f.name != "options"]
    return "repro.Stage(\n" + "\n".join(fields[:2]) + f"\n    options={{\n{options}    }},\n" \
        + "\n".join(fields[2:]) + "\n)"


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" if line.strip() else "" for line in text.splitlines())


def options_mapping(options) -> dict:
    """The options a reproducer compiles with: the same, without a dump folder
    (rerunning it should not write into the original dumps; set one to look)."""
    return {**dataclasses.asdict(options), "dump_dir": None}


def _folders(stage: repro.Stage) -> list[str]:
    halves = {"joint": ["forward", "backward"], "inference": ["forward"], "step": ["step"]}
    return [f"{stage.graph_id}-{half}" for half in halves.get(stage.name, [stage.name])]


def write(options, stage: repro.Stage, text: str) -> Path:
    """``repro.py`` in the graph's dump folder, else in a new temporary folder."""
    if options.dump_dir is not None:
        dumper = Dumper(str(options.dump_dir), _folders(stage))
        dumper.write("repro.py", text)
        written = [folder for folder in dumper.folders if folder not in dumper.failed]
        if written:
            return written[0] / "repro.py"
    folder = Path(tempfile.mkdtemp(prefix=f"retrograd-repro-{stage.graph_id}-"))
    path = folder / "repro.py"
    path.write_text(text)
    return path


def _annotate(error: BaseException, line: str) -> None:
    """Add ``line`` to retrograd's own error messages; a note on other errors."""
    if type(error).__name__ in ("PassError", "VerificationError") and len(error.args) == 1 \
            and isinstance(error.args[0], str):
        error.args = (f"{error.args[0]}\n{line}",)
    else:
        error.add_note(line)


def _leave(options, taken: Snapshot | None, error: BaseException, graph_id: str | None) -> None:
    """Write the reproducer for ``error`` and say where in its message."""
    if getattr(error, "stage", None) == "joint":
        _annotate(error, "retrograd: no reproducer: this stage compares with eager autograd "
                         "on the captured model, which a reproducer does not have")
        return
    if taken is None:
        _annotate(error, "retrograd: no reproducer: the stage's graph could not be recorded "
                         "(logged at DEBUG)")
        return
    taken.stage.graph_id = graph_id or "g-unknown"
    try:
        if isinstance(taken.graph, list):
            taken.graph = replay(taken.graph)
        text = repro_source(taken, str(error), repro.failure_signature(error))
        path = write(options, taken.stage, text)
    except Unreproducible as why:
        _annotate(error, f"retrograd: no reproducer: the graph holds {why}")
        return
    except Exception as why:  # noqa: BLE001 - never hide the compile's own error
        warnings.warn(f"retrograd: could not write a reproducer: {why}", RuntimeWarning)
        return
    log.info("retrograd: reproducer written to %s", path)
    _annotate(error, f"retrograd: reproducer: {path} (`python {path}` fails the same way "
                     f"without the model; `retrograd minify {path}` shrinks it)")


@contextlib.contextmanager
def on_failure(compiler, stage: str, graph_module: fx.GraphModule, inputs: Sequence[Any],
               **arguments):
    """Run a GraphCompiler stage; when it raises, leave a reproducer of the
    graph as it was given (``arguments``: the hook's own, see ``repro.Stage``)."""
    if not getattr(compiler, "write_reproducer", True):
        yield
        return
    if dataclasses.is_dataclass(arguments.get("gradients")):   # dead_gradient.GradientSpec
        arguments["gradients"] = dataclasses.asdict(arguments["gradients"])
    try:
        taken = snapshot(repro.Stage(stage, compiler.graph_id or "",
                                     options_mapping(compiler.options), **arguments),
                         graph_module, inputs)
    except Exception as why:  # noqa: BLE001 - a record that fails must not fail the compile
        log.debug("retrograd: no snapshot for a reproducer: %s", why)
        taken = None
    try:
        yield
    except Exception as error:
        if not getattr(error, "user_error", False):
            _leave(compiler.options, taken, error, compiler.graph_id)
        raise
