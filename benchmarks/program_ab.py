"""Time inside the torch programs of one zoo step, generated with a writer
change ("new") and without it ("old"), the two timed in turn in one process
on the same inputs, so a shared machine's load falls on both alike; also
checks the two give the same outputs bit for bit. Prints, per program, the
median of the fastest fifth of 300 runs of each (wall clock) and the median
thread CPU time.

The changes (``--change``):

- ``liveness`` (default): the liveness pass and the memory-first order
  (codegen/torch_liveness.py, torch_order.py);
- ``transposes``: transposes folded (codegen/torch_linear.py: ``F.linear``,
  composed permute chains).

    python benchmarks/program_ab.py lora
    python benchmarks/program_ab.py lora --change transposes
"""
import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import retrograd
import torch
from retrograd.codegen import torch_program
from retrograd.codegen.torch_linear import Folds
from retrograd.runtime import torch_program as runtime
from zoo import ZOO


@contextlib.contextmanager
def _without_liveness():
    keep = torch_program.tighten, torch_program.order_for_memory
    torch_program.tighten = lambda statements, foreign: [s.text for s in statements]
    torch_program.order_for_memory = lambda nodes, *rest: nodes
    try:
        yield
    finally:
        torch_program.tighten, torch_program.order_for_memory = keep


@contextlib.contextmanager
def _without_transposes():
    keep = torch_program.fold_transposes
    torch_program.fold_transposes = lambda program, donor: Folds()
    try:
        yield
    finally:
        torch_program.fold_transposes = keep


WITHOUT = {"liveness": _without_liveness, "transposes": _without_transposes}


def captured_programs(name: str) -> list:
    """(executable, program, first call's inputs) of every torch program one
    step of zoo model ``name`` runs under ``retrograd.compile``."""
    captured = []
    original_init = runtime.TorchProgramExecutable.__init__
    original_call = runtime.TorchProgramExecutable.__call__

    def init(self, program, source):
        original_init(self, program, source)
        captured.append([self, program, None])

    def call(self, args):
        for entry in captured:
            if entry[0] is self and entry[2] is None:
                entry[2] = [a.detach().clone() if isinstance(a, torch.Tensor) else a
                            for a in args]
        return original_call(self, args)

    runtime.TorchProgramExecutable.__init__ = init
    runtime.TorchProgramExecutable.__call__ = call
    try:
        entry = ZOO[name]
        torch.manual_seed(0)
        model = retrograd.compile(entry.model(), executor="torch")
        entry.run(model, entry.inputs()).backward()
    finally:
        runtime.TorchProgramExecutable.__init__ = original_init
        runtime.TorchProgramExecutable.__call__ = original_call
    return captured


def time_in_turn(executable, old, new, args, runs: int = 300) -> dict:
    """Wall and thread CPU seconds of each run of ``old`` and ``new`` in turn,
    and whether their outputs were equal bit for bit."""
    wall, cpu, results = {"old": [], "new": []}, {"old": [], "new": []}, {}
    for _ in range(runs):
        for label, ex in (("old", old), ("new", new)):
            batch = list(args)
            start, thread = time.perf_counter(), time.thread_time()
            with torch.no_grad():
                results[label] = ex.run(batch, None, executable.allocator)
            wall[label].append(time.perf_counter() - start)
            cpu[label].append(time.thread_time() - thread)
    same = all(torch.equal(a, b) for a, b in zip(results["old"], results["new"])
               if isinstance(a, torch.Tensor))
    return {"wall": wall, "cpu": cpu, "same": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=sorted(ZOO))
    parser.add_argument("--change", choices=sorted(WITHOUT), default="liveness")
    options = parser.parse_args()
    torch.set_num_threads(1)
    for executable, program, args in captured_programs(options.model):
        new_source = torch_program.generate_torch_program(program)
        with WITHOUT[options.change]():
            old_source = torch_program.generate_torch_program(program)
        new = runtime.TorchProgramExecutable(program, new_source)
        old = runtime.TorchProgramExecutable(program, old_source)
        found = time_in_turn(executable, old, new, args)
        o, n = (sorted(found["wall"][k])[:60] for k in ("old", "new"))
        old_ms, new_ms = statistics.median(o) * 1e3, statistics.median(n) * 1e3
        old_cpu, new_cpu = (statistics.median(found["cpu"][k]) * 1e3 for k in ("old", "new"))
        permutes = [source.count("torch.permute(") for source in (old_source, new_source)]
        print(f"{options.model} {program.name}: old {old_ms:.3f} ms, new {new_ms:.3f} ms, "
              f"new/old {new_ms / old_ms:.3f}; thread CPU old {old_cpu:.3f} ms, new "
              f"{new_cpu:.3f} ms, new/old {new_cpu / old_cpu:.3f}; permute calls "
              f"{permutes[0]} -> {permutes[1]}; outputs equal: {found['same']}")


if __name__ == "__main__":
    main()
