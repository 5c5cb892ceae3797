"""Helpers shared by the per-pass unit tests (tests/test_pass_*.py): a
``PassContext`` like the pipeline's, fake-mode ``make_fx`` traces of tiny
functions, fusion on such a trace, a program run with torch ops against its
graph, and hand-built ``Buffer``s for Program-IR tests."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.fx as fx
from retrograd.decompositions import decomposition_table
from retrograd.dump import Dumper
from retrograd.ir import Buffer, Kernel, Program
from retrograd.options import Options
from retrograd.passes import fusion
from retrograd.pipeline import OpSupport, PassContext
from retrograd.runtime.executor import FxExecutable
from torch.fx.experimental.proxy_tensor import make_fx

__all__ = ["aten", "context", "trace", "targets", "run_gm", "fuse", "assert_program_matches",
           "triton_kernels", "kernel_of", "buffer", "seeded"]

aten = torch.ops.aten


def context(name: str = "unit") -> PassContext:
    return PassContext(Options(), Dumper(None, []), OpSupport(), name)


def trace(fn, *inputs, decompose: bool = False) -> fx.GraphModule:
    """``fn`` as an fx graph of aten ops with fake values, returning a tuple."""
    def tupled(*args):
        result = fn(*args)
        return result if isinstance(result, tuple) else (result,)
    table = decomposition_table(full_table=True) if decompose else None
    return make_fx(tupled, tracing_mode="fake", decomposition_table=table)(*inputs)


def targets(gm: fx.GraphModule) -> list:
    return [node.target for node in gm.graph.nodes if node.op == "call_function"]


def run_gm(gm: fx.GraphModule, inputs) -> list:
    with torch.no_grad():
        return list(gm(*inputs))


def fuse(fn, *inputs, decompose: bool = False) -> tuple[Program, dict, fx.GraphModule]:
    gm = trace(fn, *inputs, decompose=decompose)
    program, stats = fusion.run(gm, context())
    return program, stats, gm


def assert_program_matches(program: Program, gm: fx.GraphModule, inputs) -> None:
    """The program's kernels, evaluated with torch ops, give the graph's results."""
    got = FxExecutable(program)(list(inputs))
    ref = run_gm(gm, inputs)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


def triton_kernels(program: Program) -> list[Kernel]:
    return program.kernels_of("triton")


def kernel_of(program: Program, node_name: str) -> Kernel:
    [kernel] = [k for k in program.kernels if node_name in k.node_names]
    return kernel


@pytest.fixture(autouse=True)
def seeded():
    """Autouse in every module that imports it: each test starts from seed 0."""
    torch.manual_seed(0)


def buffer(name, shape, role="temporary", view_of=None, strides=None, dtype="float32"):
    """A Program-IR buffer for hand-built programs (row-major unless ``strides``)."""
    if strides is None:
        strides, running = [], 1
        for size in reversed(shape):
            strides.insert(0, running)
            running *= size
    return Buffer(name, tuple(shape), tuple(strides), dtype, role, view_of)


def flat_buffer(name: str, numel: int, role: str = "temporary") -> Buffer:
    """A 1-D float32 buffer for hand-built programs."""
    return Buffer(name, (numel,), (1,), "float32", role)


def collective_kernel(name: str, target, inputs: list[str], outputs: list[str]) -> Kernel:
    """An extern kernel calling the functional collective ``target`` on a
    process group that does not exist (so no group size is known)."""
    node = SimpleNamespace(target=target, name=name, args=(None, "sum", "no such group"))
    return Kernel(name, "extern", [node], inputs, outputs)
