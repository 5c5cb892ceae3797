"""Running a program: the generated wrapper, or the fx nodes with torch ops.

``GeneratedExecutable`` loads ``program.py`` and each kernel's module and
calls ``run(args, kernels, rt)``. ``FxExecutable`` (``executor="fx"``) walks
the same kernels in the same order but evaluates each kernel's fx nodes with
torch: it runs everything the passes decided and nothing codegen wrote, so a
wrong number that appears only with generated code is a codegen bug.

Both take the boxed calling convention of AOTAutograd: a list of arguments
that they clear, so inputs can be freed as soon as they are dead.
"""

from __future__ import annotations

import functools
import gc
import operator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy
import torch
from retrograd.ir import Program
from retrograd.runtime.arena import Allocator, same_layout
from retrograd.runtime.device import device_of, interpreter_mode
from retrograd.runtime.loader import load_module, write_source
from torch import fx

__all__ = ["FxExecutable", "GeneratedExecutable", "check_inputs", "without_cycles"]


def without_cycles(launch):
    """``launch`` with the reference cycles Triton's interpreter leaves collected.

    The interpreter copies a launch's arguments through recursive closures
    (``GridExecutor._init_args_hst`` / ``_restore_args_dev``) whose cells hold
    the arguments' storages; only the cyclic collector frees them, so a
    buffer the program deletes would stay allocated until some later
    collection. Automatic collection is paused during the launch (so the
    cycle stays in the youngest generation) and that generation is collected
    after it: cheap, and buffers then die where the memory plan says.
    """
    @functools.wraps(launch)
    def run(*args):
        enabled = gc.isenabled()
        gc.disable()
        try:
            return launch(*args)
        finally:
            gc.collect(0)
            if enabled:
                gc.enable()
    return run


def check_inputs(program: Program, args: list) -> None:
    """Give every tensor input the strides the kernels were generated for."""
    fix_inputs(input_layouts(program), args)


def input_layouts(program: Program) -> list[tuple[int, torch.Size, tuple[int, ...]]]:
    """(position, shape, strides) of each planned input, computed once per program."""
    return [(position, torch.Size(buffer.shape), tuple(buffer.strides))
            for position, buffer in enumerate(program.buffers.get(name)
                                              for name in program.inputs)
            if buffer is not None]


def fix_inputs(layouts: list, args: list) -> None:
    """``check_inputs`` with the layouts precomputed: an input whose shape and
    strides are exactly the planned ones (the usual case) costs two compares."""
    for position, shape, strides in layouts:
        value = args[position]
        if not isinstance(value, torch.Tensor) or (
                value.shape == shape and value.stride() == strides):
            continue
        if not same_layout(value, shape, strides):
            args[position] = Allocator.layout(value, shape, strides)


class GeneratedExecutable:
    """A program whose kernels and wrapper are generated source files."""

    def __init__(self, program: Program, program_source: str, kernel_sources: dict[str, str],
                 interpreted: bool):
        self.program = program
        self.interpreted = interpreted
        self.paths: dict[str, Path] = {}
        # The loaded modules (releases.py handles) are held here, so the
        # program calls their functions themselves, not the wrappers that
        # would keep a handle alive: one Python call less per launch.
        self.modules = []
        launchers = {}
        for name, source in kernel_sources.items():
            path = write_source(name, source)
            self.paths[name] = path
            launch = self._function(load_module(path, interpreted), "launch")
            launchers[name] = without_cycles(launch) if interpreted else launch
        self.kernels = SimpleNamespace(**launchers)
        path = write_source(f"program_{program.name}", program_source)
        self.paths["program"] = path
        self.run = self._function(load_module(path, interpreted=False), "run")
        self.allocators: dict[torch.device, Allocator] = {}
        self.layouts = input_layouts(program)

    def _function(self, module, name: str):
        """``module.name`` unwrapped, with ``module`` kept alive by ``self``."""
        self.modules.append(module)
        function = getattr(module, name)
        return getattr(function, "__wrapped__", function)

    def __call__(self, args: list) -> list:
        fix_inputs(self.layouts, args)
        device = device_of(args)
        allocator = self.allocators.get(device)
        if allocator is None:
            allocator = self.allocators[device] = Allocator(device, self.program.constants)
        if not self.interpreted:   # beside other CUDA runs, never beside an interpreted one
            with interpreter_mode(False):
                return self.run(args, self.kernels, allocator)
        # Triton 3.9 also reads TRITON_INTERPRET while launching (lazy imports,
        # constexpr helpers), not only when decorating: keep it set meanwhile.
        # The interpreter's state is process-wide, so interpreted runs go one
        # at a time (runtime/device.py::_Gate).
        # numpy warns about lanes that are masked off or in a where's other branch
        with interpreter_mode(True), numpy.errstate(all="ignore"):
            return self.run(args, self.kernels, allocator)


class FxExecutable:
    """The program's kernels evaluated node by node with torch ops."""

    def __init__(self, program: Program):
        self.program = program

    def __call__(self, args: list) -> list:
        program = self.program
        check_inputs(program, args)
        env: dict[str, Any] = dict(zip(program.inputs, args))
        args.clear()
        env.update(program.constants)
        for name in program.frees.get(-1, []):
            env.pop(name, None)
        for index, kernel in enumerate(program.kernels):
            for node in kernel.nodes:
                env[node.name] = _evaluate(node, env, kernel.aliases)
            for name in kernel.outputs:
                buffer = program.buffers[name]
                if kernel.kind != "view" and name not in kernel.scratch:   # no value
                    env[name] = Allocator.layout(env[name], buffer.shape, buffer.strides)
            for name in program.frees.get(index, []):
                env.pop(name, None)
        return [env[o] if isinstance(o, str) else o for o in program.outputs]


#: Ops that read their tensor argument for its shape, dtype and device only.
_LIKE_OPS = {torch.ops.aten.full_like.default, torch.ops.aten.zeros_like.default,
             torch.ops.aten.ones_like.default, torch.ops.aten.empty_like.default}


def _evaluate(node: fx.Node, env: dict[str, Any], aliases: dict[str, str] | None = None) -> Any:
    def load(arg):
        if not isinstance(arg, fx.Node):
            return arg
        if arg.name not in env and node.target in _LIKE_OPS:
            # a fill inlined into a kernel that runs before (or after) the
            # value it is shaped like: its metadata is all it needs
            value = arg.meta["val"]
            return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype,
                                       device=value.device)
        if arg.name not in env:
            # a view that fusion kept in registers only: the kernel's register
            # it equals (its base may be gone from memory), else made here
            register = (aliases or {}).get(arg.name)
            if register in env:
                env[arg.name] = env[register].reshape(arg.meta["val"].shape)
            else:
                env[arg.name] = _evaluate(arg, env, aliases)
        return env[arg.name]
    args = fx.node.map_aggregate(node.args, load)
    kwargs = fx.node.map_aggregate(node.kwargs, load)
    if node.target is operator.getitem:
        return args[0][args[1]]
    return node.target(*args, **kwargs)
