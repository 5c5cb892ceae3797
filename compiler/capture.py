"""Graphs in, joint graph out: both faces end in AOTAutograd here.

``compile_graph`` hands a module (dynamo's GraphModule, or the standalone
face's wrapper around the user's module or function) to
``aot_module_simplified`` with retrograd's decomposition table (one entry
point, ``decompositions_for``) and the hooks of a ``GraphCompiler``. AOTAutograd traces the joint forward+backward
graph in functional ATen (node.meta["val"] holds fake tensors), calls our
partition_fn with it, then our forward and backward compilers, and wraps
the two in its own autograd.Function, so gradients flow through ordinary
autograd.

Shapes are static here: a graph is traced for the concrete shapes, dtypes
and integer values it is first called with, and each face keeps one
compiled graph per such signature (see ``signature``). Sizes that vary are
traced symbolically instead, once, by ``dynamic.compile_symbolic``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch._functorch.aot_autograd import aot_module_simplified
from torch._subclasses.fake_tensor import FakeTensorMode

from retrograd.decompositions import table_for, traced_right
from retrograd.errors import UnsupportedError
from retrograd.lean_runtime import lean_runtimes
from retrograd.locking import compiling
from retrograd.options import Options
from retrograd.provenance import run_recording
from retrograd.graph_compiler import GraphCompiler

__all__ = ["compile_graph", "signature", "joint_graph", "real_primals", "decompositions_for"]


def decompositions_for(executor: str | None, tensors: Sequence[Any]) -> dict:
    """The decomposition table a trace of ``tensors`` for ``executor`` uses.

    Every trace asks here: ``compile_graph`` (both faces, ``grad`` and
    ``value_and_grad`` included), ``compile_step``, ``joint_graph`` and the
    symbolic traces (``dynamic.compile_symbolic``, ``step_dynamic``). So a
    test or a study that replaces the table patches this one function. The
    torch program (``"torch"``, what ``"auto"`` runs on a CPU) keeps a few fused
    ops whole; ``None`` and the kernel executors get every decomposition codegen
    fuses (``decompositions.table_for``).
    """
    return table_for(executor, tensors)


def signature(values: Sequence[Any]) -> tuple:
    """What a compiled graph is specialized on: tensor metadata, other values as-is."""
    key = []
    for value in values:
        if isinstance(value, torch.Tensor) and value.layout != torch.strided:
            raise UnsupportedError(f"retrograd: an argument is a {value.layout} tensor (shape "
                                   f"{tuple(value.shape)}); retrograd compiles dense, strided "
                                   "tensors only: pass .to_dense() of it")
        if isinstance(value, torch.Tensor):
            key.append(("tensor", tuple(value.shape), tuple(value.stride()), value.dtype,
                        value.device, value.requires_grad))
        elif isinstance(value, torch.SymInt):
            key.append(("int", int(value)))
        else:
            try:
                hash(value)
                key.append(("value", type(value).__name__, value))
            except TypeError:
                key.append(("value", type(value).__name__, repr(value)))
    key.append(("grad", torch.is_grad_enabled()))
    for device in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device):
            key.append(("autocast", device, torch.get_autocast_dtype(device)))
    return tuple(key)


def real_primals(module: torch.nn.Module, inputs: Sequence[Any]) -> list:
    """The values AOTAutograd will see as primals: parameters, buffers, then inputs."""
    params = dict(module.named_parameters(remove_duplicate=False))
    buffers = dict(module.named_buffers(remove_duplicate=False))
    return list(params.values()) + list(buffers.values()) + list(inputs)


def _fake_inputs(inputs: Sequence[Any]) -> list:
    """Fake copies of ``inputs``, in a fake mode that admits real tensors.

    AOTAutograd traces in the fake mode of its inputs. A real tensor that the
    traced code closes over (a mask, a scale, a tensor captured by a plain
    function) would fail its default mode; this one lets make_fx record it as
    a constant of the graph (a ``get_attr`` node), where the pipeline can
    inspect it.
    """
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    return [mode.from_tensor(value) if isinstance(value, torch.Tensor) else value
            for value in inputs]


def overlaps(tensor: torch.Tensor) -> bool:
    """Whether two elements of ``tensor`` share memory other than through a
    zero stride: ``unfold`` with a step below its size, some ``as_strided``."""
    span = 0
    for stride, size in sorted((st, sz) for st, sz in zip(tensor.stride(), tensor.shape)
                               if sz > 1 and st > 0):
        if stride <= span:
            return True
        span += stride * (size - 1)
    return False


class _OutputsOwnMemory(torch.nn.Module):
    """``module`` with each output that is an overlapping view of an
    intermediate returned as a copy.

    AOTAutograd (torch 2.13; ``aot_eager`` too) hands the backward a wrong
    tangent for such an output, so its gradients came out wrong without an
    error (``(x * 2).unfold(0, 2, 1)``). A copy has the same values and the
    same gradient; only a write into the returned tensor no longer reaches the
    intermediate, which the caller cannot see anyway. Views of the inputs keep
    their aliasing (AOTAutograd regenerates those right).
    """

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        outputs = run_recording(self.inner, args)   # with the user's source lines
        inputs = [a for a in args if isinstance(a, torch.Tensor)]
        return type(outputs)(
            o.clone() if isinstance(o, torch.Tensor) and overlaps(o)
            and not any(torch._C._is_alias_of(o, i) for i in inputs) else o
            for o in outputs)


def compile_graph(module: torch.nn.Module, example_inputs: Sequence[Any], options: Options,
                  captured_text: str | None = None, gradients=None):
    """Compile ``module(*example_inputs)`` (tuple outputs); returns (callable, compiler).

    ``gradients`` (a ``dead_gradient.GradientSpec``) says which gradients the
    caller will use and which output tangents are known to be zero.
    """
    module = _OutputsOwnMemory(module)
    with compiling():   # one trace at a time in the process (locking.py)
        compiler = GraphCompiler(options, real_primals(module, example_inputs), captured_text,
                                 gradients, module=module)
        # AOTAutograd's runtime, or the lean one where its metadata allows (lean_runtime.py);
        # compiler.runtimes says which, per graph ("lean" or the reason for AOTAutograd's)
        compiler.runtimes = []
        with traced_right(), lean_runtimes(compiler.runtimes):
            compiled = aot_module_simplified(
                module, _fake_inputs(example_inputs),
                fw_compiler=compiler.compile_forward,
                bw_compiler=_once(compiler.compile_backward),
                partition_fn=compiler.partition,
                inference_compiler=compiler.compile_inference,
                decompositions=decompositions_for(options.executor, example_inputs),
            )
    return compiled, compiler


def _once(compile_backward):
    """``compile_backward`` that compiles once and then hands back the same program.

    AOTAutograd compiles the backward lazily, at the first backward call and
    outside ``compile_graph``, so it takes the compile lock itself; two
    threads making that first call at once would both compile it. One graph
    has one backward, so the second gets the first's program.
    """
    done: list = []

    def compile_once(*args, **kwargs):
        with compiling():
            if not done:
                done.append(compile_backward(*args, **kwargs))
            return done[0]
    return compile_once


class _JointCaptured(Exception):
    """Raised by the capturing partition_fn to stop AOTAutograd once it has the joint."""


def joint_graph(module: torch.nn.Module, example_inputs: Sequence[Any],
                executor: str | None = None):
    """The joint forward+backward graph retrograd's passes would see, for study.

    Returns ``(joint, joint_inputs, num_fwd_outputs)``: the GraphModule as
    AOTAutograd hands it to ``partition_fn`` (decomposed with the table
    ``decompositions_for(executor)`` gives, before any pass), its fake inputs,
    and how many of its outputs belong to the forward. ``executor=None`` traces
    as the kernel executors do (every decomposition); ``"torch"`` or ``"auto"``
    as that executor does. ``module`` must return a tensor or a tuple of them.
    """
    captured = {}

    def partition(joint, joint_inputs, **kwargs):
        captured.update(joint=joint, joint_inputs=joint_inputs,
                        num_fwd_outputs=kwargs["num_fwd_outputs"])
        raise _JointCaptured

    def never(gm, inputs):   # pragma: no cover - the partition stops first
        raise AssertionError("joint_graph compiles nothing")

    try:
        with traced_right():
            aot_module_simplified(module, list(example_inputs), fw_compiler=never,
                                  bw_compiler=never, partition_fn=partition,
                                  decompositions=decompositions_for(executor,
                                                                    example_inputs))
    except _JointCaptured:
        pass
    if not captured:
        raise ValueError("retrograd.capture.joint_graph: nothing requires grad, so there is "
                         "no joint graph")
    return captured["joint"], captured["joint_inputs"], captured["num_fwd_outputs"]
