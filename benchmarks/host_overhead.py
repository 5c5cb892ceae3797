"""Host time per kernel launch: retrograd's own Python around each launch.

Each zoo model is compiled as for a GPU (``executor="triton"``: GPU block
sizes, the compiled -- not interpreted -- ``triton.jit`` decoration), on a
machine without one. Every Triton launch is replaced by a no-op that records
it (``JITFunction.run``, where ``kernel[grid](...)`` enters Triton), and
each program (forward, backward) is called with its inputs on the ``meta``
device: allocations, views and extern aten calls then go through torch's
dispatcher without touching data, as their host side does on a GPU. What is
timed is the generated wrapper, the kernel modules' ``launch`` functions,
the runtime around them (``GeneratedExecutable.__call__``, the allocator)
and the dispatcher of the extern ops -- the host work a GPU step pays per
call, none of Triton's own launch path.

Printed per program: Triton launches (counted by the stub, per call),
extern calls, median host microseconds per call, and microseconds per
kernel (the call's time over Triton launches plus extern calls).

Inductor, beside it: on a machine without a GPU Inductor emits C++ for CPU
tensors, and its Triton CPU backend (``cpu_backend="triton"``) needs a
Triton CPU driver that the stock Triton wheel lacks, so its Triton wrapper
cannot be built here; the script tries it and prints the reason it failed.

    python benchmarks/host_overhead.py [--models mlp gpt2_tiny] [--repeats 200]
        [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

os.environ.setdefault("RETROGRAD_CACHE_DIR", tempfile.mkdtemp(prefix="retrograd-host-"))

import torch
import triton.runtime.jit as triton_jit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import retrograd
from retrograd import graph_compiler
from retrograd.environment import git_commit
from retrograd.runtime.executor import FxExecutable, GeneratedExecutable
from zoo import ZOO, clone_inputs

#: kernel names of the launches the stub saw, in order
LAUNCHES: list[str] = []


def _stub_run(self, *args, grid, warmup, **kwargs):
    """Triton's launch replaced: record the kernel and do nothing else."""
    LAUNCHES.append(self.__name__)


class _Recorded(GeneratedExecutable):
    """A GeneratedExecutable that keeps itself and its inputs (on ``meta``) and,
    while the model's step runs, computes with the program's fx nodes (its
    own launches are stubbed, so its numbers would be garbage)."""

    seen: ClassVar[list] = []

    def __call__(self, args: list) -> list:
        if not any(recorded is self for recorded, _ in self.seen):
            self.seen.append((self, [_on_meta(value) for value in args]))
        return FxExecutable(self.program)(args)


class _Extern:
    """Stands for ``aten``/``prims`` in a program's globals: every op is a
    no-op that returns this object (attributes cached, so a lookup is a dict
    read), so extern calls and views cost a Python call and no dispatch."""

    calls = 0

    def __getattr__(self, name: str):
        setattr(self, name, self)
        return self

    def __call__(self, *args, **kwargs):
        _Extern.calls += 1
        return self

    def __getitem__(self, index):
        return self


def _without_externs(executable: GeneratedExecutable) -> None:
    """Swap ``aten`` and ``prims`` in the program's module for ``_Extern``."""
    run = executable.run
    names = getattr(run, "__wrapped__", run).__globals__
    names["aten"] = names["prims"] = _Extern()


def _on_meta(value):
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype,
                                   device="meta")
    return value


def _programs(name: str) -> list[tuple[GeneratedExecutable, list]]:
    """Compile zoo model ``name`` for a GPU and run one step with launches
    stubbed; the programs it called and their inputs (on ``meta``)."""
    entry = ZOO[name]
    torch.manual_seed(0)
    model = retrograd.compile(entry.model(), executor="triton")
    _Recorded.seen = []
    inputs = clone_inputs(entry.inputs())
    entry.run(model, inputs).backward()
    return list(_Recorded.seen)


def _row(executable: GeneratedExecutable, inputs: list, repeats: int) -> dict:
    """The program timed with its extern calls on ``meta``, then stubbed."""
    full = _time(executable, inputs, repeats)
    _without_externs(executable)
    own = _time(executable, inputs, repeats)
    kernels = own["triton_launches"] + own["extern_calls"]
    return {**own, "with_meta_externs_us": full["median_us"],
            "us_per_kernel": round(own["median_us"] / max(1, kernels), 2)}


def _time(executable: GeneratedExecutable, inputs: list, repeats: int) -> dict:
    """Median host microseconds of one call, and what one call launches
    (under ``no_grad``, as AOTAutograd calls a compiled program)."""
    with torch.no_grad():
        return _measure(executable, inputs, repeats)


def _measure(executable: GeneratedExecutable, inputs: list, repeats: int) -> dict:
    call = GeneratedExecutable.__call__
    for _ in range(3):   # warm: caches of the dispatcher and of Python
        call(executable, list(inputs))
    LAUNCHES.clear()
    call(executable, list(inputs))
    launches = len(LAUNCHES)
    times = []
    for _ in range(repeats):
        arguments = list(inputs)
        start = time.perf_counter()
        call(executable, arguments)
        times.append(time.perf_counter() - start)
    program = executable.program
    externs = len(program.kernels_of("extern"))
    median = statistics.median(times) * 1e6
    return {"program": program.name, "triton_launches": launches,
            "triton_kernels": len(program.kernels_of("triton")), "extern_calls": externs,
            "views": len(program.kernels_of("view")), "median_us": round(median, 1),
            "min_us": round(min(times) * 1e6, 1)}


def _inductor_note() -> str:
    """Why Inductor's Triton wrapper is not measured here (the error it gives).
    Inductor's CPU wrapper is not comparable: its C++ kernels are called
    through one compiled entry point, not launched one by one from Python."""
    import torch._inductor.config as inductor_config
    model = ZOO["mlp"].model()
    inputs = clone_inputs(ZOO["mlp"].inputs())
    try:
        with inductor_config.patch(cpu_backend="triton"):
            compiled = torch.compile(model, backend="inductor")
            ZOO["mlp"].run(compiled, inputs).backward()
    except Exception as error:   # noqa: BLE001 -- the reason is what is reported
        return f"not measured: cpu_backend='triton' fails: {type(error).__name__}: " \
               f"{str(error).splitlines()[0][:200]}"
    return "cpu_backend='triton' compiled; stubbing its launches is not implemented here"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=sorted(ZOO))
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-inductor", action="store_true")
    options = parser.parse_args()
    triton_jit.JITFunction.run = _stub_run
    graph_compiler.choose_executor = lambda requested, device: requested
    graph_compiler.GeneratedExecutable = _Recorded
    rows = []
    print("| model | program | Triton launches | extern calls | host us per call, externs "
          "stubbed (fastest) | us per kernel | us per call, externs on meta |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name in options.models:
        for executable, inputs in _programs(name):
            row = {"model": name, **_row(executable, inputs, options.repeats)}
            rows.append(row)
            print(f"| {name} | {row['program']} | {row['triton_launches']} | "
                  f"{row['extern_calls']} | {row['median_us']} ({row['min_us']}) | "
                  f"{row['us_per_kernel']} | {row['with_meta_externs_us']} |", flush=True)
    note = "skipped" if options.no_inductor else _inductor_note()
    print(f"\nInductor: {note}")
    if options.out:
        result = {"date": time.strftime("%Y-%m-%d"), "code": git_commit(ROOT),
                  "torch": torch.__version__, "rows": rows, "inductor": note}
        options.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
