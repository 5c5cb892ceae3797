"""The lean launcher: what a generated program does per call, read from its
source and bytecode (no timing here; benchmarks/host_overhead.py times it)."""

from __future__ import annotations

import dis

import pytest
import retrograd
import torch
from retrograd import graph_compiler
from retrograd.runtime.executor import GeneratedExecutable, fix_inputs, input_layouts


@pytest.fixture
def compiled(monkeypatch):
    """A small MLP with a LayerNorm compiled for the interpreter, one step run;
    the model, its eager twin, the input and the GeneratedExecutables made."""
    made = []

    class Recording(GeneratedExecutable):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(graph_compiler, "GeneratedExecutable", Recording)
    torch.manual_seed(0)
    eager = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8),
                                torch.nn.Linear(8, 4))
    model = torch.nn.Sequential(*eager)   # the same layers, so the same parameters
    x = torch.randn(4, 4)
    got = retrograd.compile(model, executor="interpret")(x).square().sum()
    got.backward()
    grads = [p.grad.clone() for p in eager.parameters()]
    eager.zero_grad()
    loss = eager(x).square().sum()
    loss.backward()
    return made, grads, [p.grad for p in eager.parameters()], got.detach(), loss.detach()


def _sources(executable):
    return {name: path.read_text() for name, path in executable.paths.items()}


def test_the_step_is_right_with_the_lean_wrapper(compiled):
    made, grads, expected, got, loss = compiled
    assert len(made) == 2   # forward and backward went through generated code
    torch.testing.assert_close(got, loss)
    for grad, reference in zip(grads, expected):
        torch.testing.assert_close(grad, reference)


def test_launch_functions_compute_no_grid_per_call(compiled):
    """A kernel's ``launch`` holds its grid as a constant tuple (folded when the
    module compiles): no ``triton.cdiv`` call and no arithmetic per launch."""
    made, *_ = compiled
    launches = [getattr(kernel, "__wrapped__", kernel)
                for executable in made for kernel in vars(executable.kernels).values()]
    assert launches
    for launch in launches:
        code = launch.__code__
        assert "cdiv" not in code.co_names, launch
        arithmetic = [i.opname for i in dis.get_instructions(code)
                      if i.opname.startswith(("BINARY_OP", "UNARY"))]
        assert arithmetic == [], (launch, arithmetic)
        grids = [c for c in code.co_consts if isinstance(c, tuple)
                 and c and all(isinstance(n, int) and n > 0 for n in c)]
        assert grids, f"no constant grid in {launch.__module__}"


def test_the_program_allocates_without_helper_calls(compiled):
    """Planned buffers are ``as_strided`` views of one typed view per arena and
    dtype; unplanned ones ``torch.empty_strided``; typed views die with the arena."""
    made, *_ = compiled
    programs = [_sources(executable)["program"] for executable in made]
    assert any("arena = rt.arena(" in source for source in programs)
    for source in programs:
        assert "rt.empty(" not in source and "arena.view(" not in source
        if "arena = rt.arena(" in source:
            assert "arena_float32 = arena.storage.view(torch.float32)" in source
            assert "arena_float32.as_strided(" in source
            assert "del arena, arena_float32" in source


def test_the_executable_calls_launch_functions_themselves(compiled):
    """No releases.py wrapper per launch: the executable holds the module
    handles, and its launchers are the generated functions."""
    made, *_ = compiled
    for executable in made:
        assert len(executable.modules) == len(vars(executable.kernels)) + 1
        assert not hasattr(executable.run, "__retrograd_handle__")
        for launcher in vars(executable.kernels).values():
            inner = getattr(launcher, "__wrapped__", launcher)   # without_cycles
            assert not hasattr(inner, "__retrograd_handle__")
            assert inner.__code__.co_name == "launch"


def test_inputs_with_the_planned_layout_are_passed_as_they_are(compiled):
    made, *_ = compiled
    program = made[0].program
    layouts = input_layouts(program)
    assert layouts
    args = [torch.empty_strided(shape, strides) for _, shape, strides in layouts]
    kept = list(args)
    fix_inputs(layouts, args)
    assert all(a is b for a, b in zip(args, kept))
    position, shape, strides = next((p, s, t) for p, s, t in layouts if len(s) == 2)
    transposed = torch.randn(shape[1], shape[0]).t()
    args[position] = transposed
    fix_inputs(layouts, args)
    assert args[position].stride() == strides and torch.equal(args[position], transposed)
