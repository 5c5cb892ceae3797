"""The CPU default's step peaks rose when it kept GELU's derivative and layer
norm's backward whole (bc8ef05): gpt2_tiny's compile_step 101,056 -> 109,760
bytes, lora's 57,616 -> 59,656 (benchmarks/peaks.py). Two causes, two fixes:

- the schedule ran a kernel of recomputation copies as soon as it added the
  fewest bytes, in the forward even, and held its result to the backward
  (``passes/planning/lazy.py``: such kernels now run when a reader needs them);
- the whole ``gelu_backward``, called by its entry point, had no ``out=``
  and allocated beside the gradient it reads, which the decomposed chain
  wrote over (``codegen/torch_out.py``: its aten out overload now does).

The relation checked on the models: keeping ops whole never raises the
measured step peak above that of the fully decomposed trace.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import retrograd
import torch
from pass_helpers import (
    buffer,
    context,
    seeded,  # noqa: F401  (autouse: each test from seed 0)
)
from retrograd import decompositions
from retrograd.ir import Kernel, Program
from retrograd.passes import schedule
from retrograd.passes.op_classes import PHASE, RECOMPUTED
from zoo import ZOO, clone_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from measuring import profiled_peak


def _node(phase: str, recomputed: bool = False) -> SimpleNamespace:
    meta = {PHASE: phase, **({RECOMPUTED: "original"} if recomputed else {})}
    return SimpleNamespace(meta=meta)


def _step_program() -> Program:
    """A step's shape: a forward of two 64-element temporaries, a recomputation
    copy ``r`` of 48 elements read from the input alone, and a backward ``g``
    that reads the forward's last value and ``r``. Ready at the start, ``r``
    adds fewer bytes than the forward's next kernel."""
    buffers = {"a": buffer("a", (16,), "input"), "f1": buffer("f1", (64,)),
               "f2": buffer("f2", (64,)), "r": buffer("r", (48,)),
               "g": buffer("g", (16,), "output")}
    kernels = [Kernel("forward_1", "triton", [_node("forward")], ["a"], ["f1"]),
               Kernel("forward_2", "triton", [_node("forward")], ["f1"], ["f2"]),
               Kernel("recompute_r", "triton", [_node("backward", True)], ["a"], ["r"]),
               Kernel("backward_g", "triton", [_node("backward")], ["f2", "r"], ["g"])]
    return Program("step", buffers, kernels, inputs=["a"], outputs=["g"])


def test_a_recomputation_runs_just_before_its_reader():
    program = _step_program()
    program.kernels = [program.kernels[i] for i in (2, 0, 1, 3)]   # recompute first
    before = schedule.peak_live_bytes(program)   # r held across the forward: 256 + 192
    schedule.run(program, context())
    assert [k.name for k in program.kernels] == [
        "forward_1", "forward_2", "recompute_r", "backward_g"]
    assert schedule.peak_live_bytes(program) < before


def test_without_copies_the_greedy_is_unchanged():
    """A backward kernel that is no recomputation copy is not deferred."""
    program = _step_program()
    program.kernels[2].nodes = [_node("backward")]
    program.kernels = [program.kernels[i] for i in (2, 0, 1, 3)]
    schedule.run(program, context())
    assert program.kernels[0].name == "recompute_r"   # fewest bytes first, as before


class _GeluMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 32), torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x), approximate="tanh")).sum()


def test_a_whole_gelu_backward_writes_over_the_dying_gradient(tmp_path):
    torch.manual_seed(0)
    model, x = _GeluMLP(), torch.randn(6, 8)
    reference = copy.deepcopy(model)
    compiled = retrograd.compile(model, executor="torch", dump_dir=str(tmp_path))
    compiled(x).backward()
    reference(x).backward()
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got.grad, want.grad)
    [backward] = [p.read_text() for p in tmp_path.glob("*backward*/program.py")]
    assert "aten.gelu_backward.grad_input(" in backward
    assert "approximate='tanh'" in backward.split("aten.gelu_backward.grad_input(")[1]


def _step_peak(name: str, executor: str = "torch") -> tuple[int, dict]:
    """Measured peak of one compile_step (SGD, momentum 0.9) after two
    warm-ups, as benchmarks/peaks.py's compile_step column; and the
    parameters after those three steps."""
    entry = ZOO[name]
    torch.manual_seed(0)
    model, inputs = entry.model(), entry.inputs()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.01, momentum=0.9)
    step = retrograd.compile_step(model, lambda m, *batch: entry.run(m, batch), optimizer,
                                  executor=executor)
    for _ in range(2):
        step(*clone_inputs(inputs))
    batch = clone_inputs(inputs)
    peak = profiled_peak(lambda: step(*batch))
    return peak, {n: p.detach().clone() for n, p in model.named_parameters()}


def _decomposed(monkeypatch) -> None:
    """Trace with every decomposition, the torch program's whole ops included."""
    monkeypatch.setattr(decompositions, "TORCH_WHOLE", set())
    decompositions.decomposition_table.cache_clear()


@pytest.mark.parametrize("name", ["lora", pytest.param("gpt2_tiny", marks=pytest.mark.slow)])
def test_whole_ops_do_not_raise_the_step_peak(name, monkeypatch):
    whole, parameters = _step_peak(name)
    _decomposed(monkeypatch)
    try:
        decomposed, reference = _step_peak(name)
    finally:
        monkeypatch.undo()
        decompositions.decomposition_table.cache_clear()
    assert whole <= decomposed
    for key, value in reference.items():
        torch.testing.assert_close(parameters[key], value, rtol=1e-4, atol=1e-5)


class _Embedder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.out = torch.nn.Embedding(40, 16), torch.nn.Linear(16, 3)

    def forward(self, ids):
        return self.out(self.embed(ids)).square().sum()


def test_an_embedding_gradient_is_scattered_into_its_zeros_in_place(tmp_path):
    """``index_put(zeros, [ids], rows, accumulate=True)`` out of place held the
    zeros and their copy together (LLaMA's backward peak: 113,416 bytes against
    default_partition's 101,640, benchmarks/pareto.py); now ``zeros.index_put_``."""
    torch.manual_seed(0)
    model, ids = _Embedder(), torch.randint(0, 40, (2, 5))
    reference = copy.deepcopy(model)
    compiled = retrograd.compile(model, executor="torch", dump_dir=str(tmp_path))
    for _ in range(2):   # twice: the in-place write must not leak into the next call
        compiled(ids).backward()
        reference(ids).backward()
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got.grad, want.grad)
    [backward] = [p.read_text() for p in tmp_path.glob("*backward*/program.py")]
    assert ".index_put_(" in backward and "torch.index_put(" not in backward


@pytest.mark.slow
@pytest.mark.cpu_default   # the pareto rows run retrograd's default executor
def test_llama_step_peaks_at_or_below_default_partition():
    """benchmarks/pareto.py's LLaMA rows, default budget, measured here."""
    import pareto
    row = pareto.measure("llama", "retrograd")
    torch._dynamo.reset()
    assert row["peak_bytes"] <= pareto.measure("llama", "default_partition")["peak_bytes"]
