"""The extern scratch probe (compiler/extern_scratch.py): a convolution's
scratch measured by one call under the legacy profiler, checked against
torch's kineto profiler on an eager call; and where it does not probe, the
estimate, labelled with the reason."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from retrograd import extern_scratch
from retrograd.ir import Buffer, Kernel, Kind, Program
from torch import fx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from measuring import profiled_allocations  # noqa: E402

aten = torch.ops.aten
INPUT = torch.randn(2, 4, 4, 4).contiguous(memory_format=torch.channels_last)
WEIGHT = torch.randn(4, 4, 3, 3)
CONV_ARGS = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)


def _buffer(name: str, value: torch.Tensor, role: str) -> Buffer:
    return Buffer(name, tuple(value.shape), tuple(value.stride()), str(value.dtype)[6:], role)


def _conv_program(target=aten.convolution.default) -> tuple[Program, Kernel]:
    graph = fx.Graph()
    x, w = graph.placeholder("x"), graph.placeholder("w")
    x.meta["val"], w.meta["val"] = INPUT, WEIGHT
    conv = graph.call_function(target, (x, w, None, *CONV_ARGS))
    conv.meta["val"] = target(INPUT, WEIGHT, None, *CONV_ARGS)
    kernel = Kernel("extern_convolution", Kind.EXTERN, [conv], ["x", "w"], [conv.name])
    buffers = {"x": _buffer("x", INPUT, "input"), "w": _buffer("w", WEIGHT, "input"),
               conv.name: _buffer(conv.name, conv.meta["val"], "output")}
    return Program("probe", buffers, [kernel], ["x", "w"], [conv.name]), kernel


def _kineto_scratch() -> int:
    """Peak minus final of an eager call's allocations, by torch's kineto profiler."""
    results = []
    peak, final = profiled_allocations(
        lambda: results.append(aten.convolution.default(INPUT, WEIGHT, None, *CONV_ARGS)))
    return peak - final


def test_a_convolution_scratch_is_what_torch_profiler_measures():
    program, kernel = _conv_program()
    found = extern_scratch.scratch(program, kernel)
    assert found.what == extern_scratch.MEASURED
    assert found.nbytes == _kineto_scratch() > 0


def _estimate(program: Program, kernel: Kernel) -> int:
    return sum(program.buffers[n].nbytes for n in kernel.inputs + kernel.outputs)


def test_over_the_limit_the_estimate_says_so(monkeypatch):
    monkeypatch.setattr(extern_scratch, "PROBE_LIMIT_BYTES", 0)
    program, kernel = _conv_program()
    found = extern_scratch.scratch(program, kernel)
    assert found.nbytes == _estimate(program, kernel)
    assert found.what.startswith("extern scratch (estimate") and "probe limit" in found.what


def test_under_a_running_profiler_the_estimate_says_so(monkeypatch):
    monkeypatch.setattr(extern_scratch, "_PROBED", {})
    program, kernel = _conv_program()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        found = extern_scratch.scratch(program, kernel)
    assert found.nbytes == _estimate(program, kernel)
    assert "a torch profiler was already running" in found.what


def test_an_operand_off_the_cpu_is_not_probed():
    program, kernel = _conv_program()
    kernel.nodes[0].args[0].meta["val"] = INPUT.to("meta")
    found = extern_scratch.scratch(program, kernel)
    assert found.nbytes == _estimate(program, kernel)
    assert "on meta, not the CPU" in found.what


def test_under_a_fake_tensor_mode_the_estimate_says_so(monkeypatch):
    monkeypatch.setattr(extern_scratch, "_PROBED", {})
    program, kernel = _conv_program()
    with torch._subclasses.fake_tensor.FakeTensorMode():
        found = extern_scratch.scratch(program, kernel)
    assert found.nbytes == _estimate(program, kernel)
    assert "dispatch mode" in found.what
