"""A training step on CPU: eager, torch.compile (Inductor) and retrograd's default.

Per zoo model (tests/zoo.py), one forward + backward, each variant on its
own copy of the model and the same inputs:

- ``eager``: the model in PyTorch;
- ``inductor``: ``torch.compile(model)`` (Inductor's C++/OpenMP code on CPU);
- ``retrograd``: ``retrograd.compile(model)`` with ``executor="auto"``, which
  on CPU runs the torch program (codegen/torch_program.py);
- ``retrograd out=`` (``--arena``): the same program with extern calls
  writing into their arena slots (``out=``), to compare with plain allocation.

Inductor runs last in each round: its OpenMP threads keep spinning for a
while after a kernel and slowed whichever variant ran right after it (the
CNN's retrograd step measured 11 ms there, 1.9 ms anywhere else).

Each step is timed by the wall clock and by this thread's CPU time
(``time.thread_time``; the ratio of medians printed for both): on a shared
machine the CPU time leaves out the time other jobs held the core, which
the wall clock counts and which made whole rows noise at load 5-10.

The variants' steps are interleaved (one step of each in turn, ``--repeats``
rounds after ``--warmup``), so a neighbour's load on a shared machine falls
on all of them alike; the median and the fastest step are printed, the
ratio of medians to eager's, and how much of retrograd's step was spent
inside its two torch programs (timed around their calls; the rest is the
call's fixed work: the trace cache's key and guards, the autograd runtime
around the programs -- retrograd's lean one, ``compiler/lean_runtime.py``,
or AOTAutograd's where a graph needs it; each row records which -- and
autograd's engine). Saved bytes are measured, not read from the
report: the unique storages autograd holds for the backward
(``saved_tensors_hooks``, parameters and inputs left out; measuring.py).

    python benchmarks/cpu_step.py [--models mlp gpt2_tiny] [--no-inductor] [--out results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RETROGRAD_CACHE_DIR", tempfile.mkdtemp(prefix="retrograd-cpu-step-"))

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import retrograd
from interpreter_cost import _environment, _finish
from measuring import saved_storage_bytes
from zoo import ZOO, clone_inputs

CLOCK: _ProgramClock | None = None   # set in main
MODELS = ["mlp", "cnn", "attention_block", "gpt2_tiny", "lora", "mlp_frozen"]


def _variants(arena: bool) -> dict:
    """Name -> (how to wrap a fresh model, what holds while it compiles)."""
    plain = contextlib.nullcontext
    variants = {"eager": (lambda model: model, plain),
                "retrograd": (retrograd.compile, plain)}
    if arena:
        variants["retrograd out="] = (retrograd.compile, _arena_program)
    variants["inductor"] = (torch.compile, plain)   # last: see the module docstring
    return variants


@contextlib.contextmanager
def _arena_program():
    """While the first step compiles (forward, then backward): torch programs
    whose extern calls write into their arena slots (``out=``)."""
    from retrograd import graph_compiler
    original = graph_compiler.generate_torch_program
    graph_compiler.generate_torch_program = \
        lambda program, title="": original(program, title, arena=True)
    try:
        yield
    finally:
        graph_compiler.generate_torch_program = original


class _ProgramClock:
    """Seconds spent inside torch programs (both halves), read around each step:
    what the program costs apart from the call's fixed work (guards, autograd)."""

    def __init__(self):
        from retrograd.runtime.torch_program import TorchProgramExecutable
        self.spent = 0.0
        call = TorchProgramExecutable.__call__

        def timed(executable, args):
            start = time.perf_counter()
            try:
                return call(executable, args)
            finally:
                self.spent += time.perf_counter() - start
        TorchProgramExecutable.__call__ = timed


def _step(entry, model, inputs) -> tuple[float, float]:
    """One step's wall-clock and this thread's CPU seconds: on a shared machine
    the CPU time leaves out the time other jobs held the core."""
    copies = clone_inputs(inputs)
    start, cpu = time.perf_counter(), time.thread_time()
    entry.run(model, copies).backward()
    return time.perf_counter() - start, time.thread_time() - cpu


def _saved_bytes(entry, model, module, inputs) -> int:
    copies = clone_inputs(inputs)
    excluded = [*module.parameters(), *module.buffers(), *copies]
    return saved_storage_bytes(lambda: entry.run(model, copies), excluded)


def measure(name: str, variants: dict, warmup: int, repeats: int) -> dict:
    """Interleaved step times and saved bytes of every variant on ``name``."""
    entry = ZOO[name]
    torch.manual_seed(1)
    inputs = entry.inputs()
    built, modules, first = {}, {}, {}
    for variant, (wrap, compiling) in variants.items():
        torch.manual_seed(0)
        modules[variant] = entry.model()
        built[variant] = wrap(modules[variant])
        with compiling():
            first[variant] = _step(entry, built[variant], inputs)[0]   # compiles
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    cpu: dict[str, list[float]] = {variant: [] for variant in variants}
    inside: list[float] = []
    for round_ in range(warmup + repeats):
        for variant, model in built.items():
            CLOCK.spent = 0.0
            spent, used = _step(entry, model, inputs)
            if round_ >= warmup:
                times[variant].append(spent)
                cpu[variant].append(used)
                if variant == "retrograd":
                    inside.append(CLOCK.spent)
    row = {"model": name, "retrograd_program_median_s": statistics.median(inside),
           "retrograd_program_min_s": min(inside),
           "retrograd_runtimes": _runtimes(built["retrograd"])}
    for variant in variants:
        row[variant] = {"first_call_s": first[variant],
                        "median_s": statistics.median(times[variant]),
                        "min_s": min(times[variant]),
                        "cpu_median_s": statistics.median(cpu[variant]),
                        "saved_bytes": _saved_bytes(entry, built[variant], modules[variant],
                                                    inputs)}
    return row


def _runtimes(compiled) -> list | None:
    """Per graph of the last call, "lean" or why AOTAutograd's runtime ran
    (None for code before lean_runtime.py, when measuring an older tree)."""
    compiler = getattr(getattr(compiled, "_cache", None), "last", None)
    return getattr(getattr(compiler, "compiler", None), "runtimes", None)


def _print(rows: list[dict], variants: list[str]) -> None:
    print("| model | " + " | ".join(variants) + " | "
          + " | ".join(f"{v} / eager" for v in variants[1:]) + " | "
          + " | ".join(f"{v} / eager, CPU time" for v in variants[1:]) + " | saved bytes ("
          + ", ".join(variants) + ") | retrograd: inside its programs |")
    print("| --- |" + " ---: |" * (3 * len(variants) - 2) + " ---: | ---: |")
    for row in rows:
        cells = [f"{row[v]['median_s'] * 1e3:.2f} ({row[v]['min_s'] * 1e3:.2f}) ms"
                 for v in variants]
        ratios = [f"{row[v]['median_s'] / row['eager']['median_s']:.2f}x" for v in variants[1:]]
        ratios += [f"{row[v]['cpu_median_s'] / row['eager']['cpu_median_s']:.2f}x"
                   for v in variants[1:]]
        saved = ", ".join(f"{row[v]['saved_bytes']:,}" for v in variants)
        program = f"{row['retrograd_program_median_s'] * 1e3:.2f} ms"
        print(f"| {row['model']} | {' | '.join(cells)} | {' | '.join(ratios)} | {saved} "
              f"| {program} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=sorted(ZOO))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch's intra-op threads (1 on a shared machine)")
    parser.add_argument("--arena", action="store_true",
                        help="also the torch program with out= into the arena")
    parser.add_argument("--no-inductor", action="store_true",
                        help="leave Inductor out (its compiles take most of a run)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = _ProgramClock()
    before = _environment()
    variants = _variants(args.arena)
    if args.no_inductor:
        del variants["inductor"]
    rows = [measure(name, variants, args.warmup, args.repeats) for name in args.models]
    _print(rows, list(variants))
    _finish(before, rows, args.out)


if __name__ == "__main__":
    main()
