"""Time inside the torch programs of one zoo step, written with the
transposes folded (codegen/torch_linear.py: ``F.linear``, composed permute
chains: "new") and without (every permute its own call: "old"), the two
timed in turn in one process on the same inputs, so a shared machine's load
falls on both alike; also checks the two give the same outputs bit for bit.
Prints the median of the fastest fifth of 300 runs of each program (wall
clock) and the median thread CPU time.

    python benchmarks/transposes_ab.py lora
"""
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

torch.set_num_threads(1)
captured = []
original_init = runtime.TorchProgramExecutable.__init__
original_call = runtime.TorchProgramExecutable.__call__

def init(self, program, source):
    original_init(self, program, source)
    captured.append([self, program, None])

def call(self, args):
    for entry in captured:
        if entry[0] is self and entry[2] is None:
            entry[2] = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
    return original_call(self, args)

runtime.TorchProgramExecutable.__init__ = init
runtime.TorchProgramExecutable.__call__ = call
name = sys.argv[1]
entry = ZOO[name]
torch.manual_seed(0)
model = retrograd.compile(entry.model(), executor="torch")
entry.run(model, entry.inputs()).backward()

def old_source(program):
    keep = torch_program.fold_transposes
    torch_program.fold_transposes = lambda program, donor: Folds()
    try:
        return torch_program.generate_torch_program(program)
    finally:
        torch_program.fold_transposes = keep

snapshot = captured[:]   # the loop below makes executables of its own
for executable, program, args in snapshot:
    new = runtime.TorchProgramExecutable(program, torch_program.generate_torch_program(program))
    old = runtime.TorchProgramExecutable(program, old_source(program))
    times = {"old": [], "new": []}
    cpu = {"old": [], "new": []}
    results = {}
    for _ in range(300):
        for label, ex in (("old", old), ("new", new)):
            batch = list(args)
            start, thread = time.perf_counter(), time.thread_time()
            with torch.no_grad():
                results[label] = ex.run(batch, None, executable.allocator)
            times[label].append(time.perf_counter() - start)
            cpu[label].append(time.thread_time() - thread)
    same = all(torch.equal(a, b) for a, b in zip(results["old"], results["new"])
               if isinstance(a, torch.Tensor))
    o, n = (sorted(times[k])[:60] for k in ("old", "new"))
    old_ms, new_ms = statistics.median(o) * 1e3, statistics.median(n) * 1e3
    old_cpu, new_cpu = (statistics.median(cpu[k]) * 1e3 for k in ("old", "new"))
    permutes = [source.count("torch.permute(") for source in
                (old_source(program), torch_program.generate_torch_program(program))]
    print(f"{name} {program.name}: old {old_ms:.3f} ms, new {new_ms:.3f} ms, "
          f"new/old {new_ms / old_ms:.3f}; thread CPU old {old_cpu:.3f} ms, new "
          f"{new_cpu:.3f} ms, new/old {new_cpu / old_cpu:.3f}; permute calls "
          f"{permutes[0]} -> {permutes[1]}; outputs equal: {same}")
