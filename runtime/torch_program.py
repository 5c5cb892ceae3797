"""Running a torch program (``executor="torch"``, the CPU default).

The program's source (``codegen/torch_program.py``) is written to the kernel
cache and loaded like every generated file (``loader.py``: verified bytes,
registered in ``linecache`` so tracebacks show its lines); ``run(args,
kernels, rt)`` is then called directly. No Triton, no interpreter gate: torch
calls from several threads at once are as safe as in eager.
"""

from __future__ import annotations

from pathlib import Path

from retrograd.ir import Program
from retrograd.runtime.arena import Allocator
from retrograd.runtime.device import device_of
from retrograd.runtime.loader import load_module, write_source

__all__ = ["TorchProgramExecutable"]


class TorchProgramExecutable:
    """A program written out as torch calls, loaded once, called per step."""

    def __init__(self, program: Program, source: str):
        self.program = program
        self.path: Path = write_source(f"torch_program_{program.name}", source)
        self.paths = {"program": self.path}
        # the handle keeps the module alive as long as this executable (releases.py)
        self.module = load_module(self.path, interpreted=False)
        self.run = self.module.run
        self.allocator: Allocator | None = None

    def __call__(self, args: list) -> list:
        # the program itself gives its inputs their planned strides (one test each)
        allocator = self.allocator
        if allocator is None:   # a program serves one device: its guards say so
            allocator = self.allocator = Allocator(device_of(args), self.program.constants)
        return self.run(args, None, allocator)
