"""``python program.py`` in a dump folder: run the program alone and time each kernel.

The dump's ``program.py`` ends with a block (``main_block``) that records
the shapes, strides and dtypes of the program's inputs and constants and
calls ``main`` here, as Inductor's output code calls
``compiled_module_main`` (its ``benchmark_compiled_module``). ``main`` loads
the kernels from the dump's ``kernels/`` folder, makes random inputs and
tensor constants of the recorded layouts (floats from a normal distribution,
integers 0 or 1 as verify does, so indices stay in range; the timing needs
no true values), runs the program once to warm up,
then:

- times whole runs (the median of ``--repeat``), as the program runs;
- times each kernel: the wrapper's text is run again with a clock read
  before each ``# t:`` block (on a GPU after a synchronize), so a kernel's
  time is its block's: allocation, launch or extern call, and frees;
- with ``--trace PATH``, writes the dump's ``trace.json`` (schedule order,
  memory counters) with the measured times in place of schedule positions.

The numbers are measurements of this run, on this machine; on a CPU the
Triton kernels run in Triton's interpreter, which is slow (about 1.5 ms per
program instance) and says nothing about a GPU.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from time import perf_counter
from types import SimpleNamespace
from typing import Any

import torch

__all__ = ["main", "main_block", "random_tensor", "timed_source"]

_BLOCK = re.compile(r"^    # (\d+): (\w+) (\S+) \(")


def main_block(program, executor: str) -> str:
    """The text appended to the dump's ``program.py``: recorded layouts and a main."""
    inputs = []
    for name in program.inputs:
        buffer = program.buffers.get(name)
        layout = None if buffer is None else (buffer.shape, buffer.strides, buffer.dtype)
        inputs.append(f"    ({name!r}, {layout!r}),")
    constants = []
    for name, value in program.constants.items():
        if isinstance(value, torch.Tensor):
            recorded = ("tensor", tuple(value.shape), tuple(value.stride()),
                        str(value.dtype).removeprefix("torch."))
        elif isinstance(value, (bool, int, float, type(None))):
            recorded = ("value", value)
        else:
            recorded = ("unrecorded", type(value).__name__)
        constants.append(f"    {name!r}: {recorded!r},")
    return "\n".join([
        "", "",
        "# -- python program.py [--repeat N] [--trace PATH]: run the program on random inputs",
        "# of the recorded layouts and print the time per kernel (retrograd/program_bench.py)",
        "INPUTS = [  # name, (shape, strides, dtype), or None for an input that is no tensor",
        *inputs, "]",
        "CONSTANTS = {  # name: ('tensor', shape, strides, dtype) or ('value', value)",
        *constants, "}",
        f"EXECUTOR = {executor!r}  # what the program was compiled for",
        "",
        'if __name__ == "__main__":',
        "    from retrograd.program_bench import main",
        "    main(__file__, INPUTS, CONSTANTS, EXECUTOR)",
        ""])


def random_tensor(shape, strides, dtype: str, device: torch.device) -> torch.Tensor:
    """A tensor of the layout with random values (integers 0 or 1: safe as indices).
    The storage it spans is filled, then viewed: a layout may repeat elements
    (stride 0, an expanded input), which in-place random fills refuse."""
    span = 0 if 0 in shape else 1 + sum((size - 1) * stride for size, stride in
                                        zip(shape, strides))
    storage = torch.empty(span, dtype=getattr(torch, dtype), device=device)
    if storage.dtype.is_floating_point or storage.dtype.is_complex:
        storage.normal_()
    elif storage.dtype == torch.bool:
        storage.bernoulli_(0.5)
    else:
        storage.random_(0, 2)
    return storage.as_strided(shape, strides)


def timed_source(source: str) -> str:
    """The wrapper's text with ``_tick(t)`` where kernel ``t``'s block starts (the
    blank line before its ``# t:`` comment, so its arena is counted in) and
    ``_tick(None)`` before the ``return``."""
    lines = source.splitlines()
    out: list[str] = []
    for line in lines:
        match = _BLOCK.match(line)
        if match:
            blank = max(i for i, text in enumerate(out) if not text.strip())
            out.insert(blank + 1, f"    _tick({int(match.group(1))})")
        elif line.startswith("    return "):
            out.append("    _tick(None)")
        out.append(line)
    return "\n".join(out) + "\n"


def _device(executor: str) -> torch.device:
    if executor == "fx":
        sys.exit("retrograd: this program was compiled with executor='fx': the dump has no "
                 "kernel sources to run; compile with executor='triton' (a GPU) or "
                 "'interpret' (the CPU) to benchmark it")
    if executor == "triton":
        if not torch.cuda.is_available():
            sys.exit("retrograd: this program was compiled for a CUDA device and none is "
                     "available here")
        return torch.device("cuda")
    return torch.device("cpu")


def _load_kernels(folder: Path, interpreted: bool) -> SimpleNamespace:
    """Each ``kernels/<name>.py`` of the dump as a module; its ``launch``."""
    from retrograd.runtime.executor import without_cycles
    launchers = {}
    for path in sorted((folder / "kernels").glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"retrograd_dump.{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        launchers[path.stem] = without_cycles(module.launch) if interpreted else module.launch
    return SimpleNamespace(**launchers)


def _constants(recorded: dict, device: torch.device) -> dict[str, Any]:
    values = {}
    for name, entry in recorded.items():
        if entry[0] == "tensor":
            values[name] = random_tensor(*entry[1:], device)
        elif entry[0] == "value":
            values[name] = entry[1]
        else:
            sys.exit(f"retrograd: constant {name} is a {entry[1]}, which the dump did not "
                     "record; program.py cannot rebuild it")
    return values


def _inputs(recorded: list, device: torch.device) -> list[torch.Tensor]:
    for name, layout in recorded:
        if layout is None:
            sys.exit(f"retrograd: input {name} is not a tensor and its value was not "
                     "recorded; program.py cannot make it up")
    return [random_tensor(*layout, device) for _, layout in recorded]


def _parse(argv, interpreted: bool) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run this retrograd program on random inputs "
                                     "of the recorded shapes and print the time per kernel.")
    parser.add_argument("--repeat", type=int, default=3 if interpreted else 20,
                        help="timed runs (after one warm-up run)")
    parser.add_argument("--trace", type=Path, help="write the dump's trace.json with the "
                        "measured times here (open it in ui.perfetto.dev)")
    return parser.parse_args(argv)


class _Clock:
    """``_tick(t)``: the time since the previous tick goes to the block it started."""

    def __init__(self, sync: Callable[[], None]):
        self.sync = sync
        self.spent: dict[int, float] = {}
        self.current: int | None = None
        self.since = 0.0

    def __call__(self, index: int | None) -> None:
        self.sync()
        now = perf_counter()
        if self.current is not None:
            self.spent[self.current] = self.spent.get(self.current, 0.0) + now - self.since
        self.current = index
        self.since = perf_counter()


def _runner(source: str, path: str, clock: _Clock | None = None) -> Callable:
    """``run`` of the wrapper's text (timed: with the clock's ticks), compiled here."""
    namespace: dict[str, Any] = {"__name__": "retrograd_dump_program", "_tick": clock}
    text = source if clock is None else timed_source(source)
    exec(compile(text, path, "exec"), namespace)  # noqa: S102 -- the dump's own program.py
    return namespace["run"]


def _measure(run: Callable, make_args: Callable, kernels, rt, sync, repeat: int) -> list[float]:
    seconds = []
    for _ in range(repeat):
        args = make_args()
        sync()
        start = perf_counter()
        run(args, kernels, rt)
        sync()
        seconds.append(perf_counter() - start)
    return seconds


def _blocks(source: str) -> dict[int, tuple[str, str]]:
    """Kernel position -> (kind, name), from the wrapper's ``# t: kind name (...)`` lines."""
    return {int(m.group(1)): (m.group(2), m.group(3))
            for m in map(_BLOCK.match, source.splitlines()) if m}


def _print(name: str, device, blocks, whole: list[float], per_kernel: dict[int, float],
           repeat: int) -> None:
    where = "cpu (Triton's interpreter: slow, says nothing about a GPU)" \
        if device.type == "cpu" else str(device)
    total = sum(per_kernel.values()) or 1.0
    print(f"{name}: {len(blocks)} kernels on {where}; random inputs of the recorded shapes")
    print(f"whole program: {statistics.median(whole) * 1e3:.3f} ms (median of {repeat} "
          f"run{'' if repeat == 1 else 's'})")
    print(f"{'kernel':>6s}  {'kind':7s} {'name':44s} {'ms':>10s} {'share':>6s}")
    for index, (kind, kernel) in sorted(blocks.items()):
        spent = per_kernel.get(index, 0.0)
        print(f"{index:6d}  {kind:7s} {kernel:44s} {spent * 1e3:10.3f} "
              f"{spent / total:6.1%}")
    print(f"{'':6s}  {'total':52s} {total * 1e3:10.3f}   (per-kernel medians of {repeat} "
          f"run{'' if repeat == 1 else 's'} with a clock read between kernels)")


def _write_trace(folder: Path, out: Path, blocks, per_kernel: dict[int, float]) -> None:
    from retrograd.perfetto import retime
    source = folder / "trace.json"
    if not source.is_file():
        sys.exit(f"retrograd: no {source} to retime (a dump from an older retrograd?)")
    trace = retime(json.loads(source.read_text()),
                   [per_kernel.get(index, 0.0) * 1e6 for index in range(len(blocks))])
    out.write_text(json.dumps(trace, indent=1) + "\n")
    print(f"wrote {out} (measured times; open it in https://ui.perfetto.dev)")


def main(path: str, inputs: list, constants: dict, executor: str, argv=None) -> None:
    """Benchmark the program in ``path`` (the dump's program.py); see the module docstring."""
    import numpy
    from retrograd.runtime.arena import Allocator
    from retrograd.runtime.device import interpreter_mode
    interpreted = executor == "interpret"
    device = _device(executor)
    options = _parse(argv, interpreted)
    folder = Path(path).resolve().parent
    source = Path(path).read_text()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = _Clock(sync)
    with interpreter_mode(interpreted), numpy.errstate(all="ignore"):
        kernels = _load_kernels(folder, interpreted)
        rt = Allocator(device, _constants(constants, device))
        run, timed = _runner(source, path), _runner(source, path, clock)
        make_args = functools.partial(_inputs, inputs, device)
        _measure(run, make_args, kernels, rt, sync, 1)   # warm-up (Triton compiles on a GPU)
        whole = _measure(run, make_args, kernels, rt, sync, options.repeat)
        runs = []
        for _ in range(options.repeat):
            clock.spent = {}
            _measure(timed, make_args, kernels, rt, sync, 1)
            runs.append(clock.spent)
    blocks = _blocks(source)
    per_kernel = {index: statistics.median(r.get(index, 0.0) for r in runs) for index in blocks}
    _print(folder.name, device, blocks, whole, per_kernel, options.repeat)
    if options.trace is not None:
        _write_trace(folder, options.trace, blocks, per_kernel)
