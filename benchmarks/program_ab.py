"""Time inside the torch programs of one zoo step, generated with the
liveness pass and the memory-first order (codegen/torch_liveness.py,
torch_order.py: "new") and without them ("old"), the two timed in turn in one
process on the same inputs, so a shared machine's load falls on both alike.
Prints the median of the fastest fifth of 300 runs of each program.

    python benchmarks/program_ab.py lora
"""
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import retrograd
import torch
from retrograd.codegen import torch_program
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
    keep = torch_program.tighten, torch_program.order_for_memory
    torch_program.tighten = lambda statements, foreign: [s.text for s in statements]
    torch_program.order_for_memory = lambda nodes, *rest: nodes
    try:
        return torch_program.generate_torch_program(program)
    finally:
        torch_program.tighten, torch_program.order_for_memory = keep

snapshot = captured[:]   # the loop below makes executables of its own
for executable, program, args in snapshot:
    new = runtime.TorchProgramExecutable(program, torch_program.generate_torch_program(program))
    old = runtime.TorchProgramExecutable(program, old_source(program))
    times = {"old": [], "new": []}
    for _ in range(300):
        for label, ex in (("old", old), ("new", new)):
            batch = list(args)
            start = time.perf_counter()
            with torch.no_grad():
                ex.run(batch, None, executable.allocator)
            times[label].append(time.perf_counter() - start)
    o, n = (sorted(times[k])[:60] for k in ("old", "new"))
    old_ms, new_ms = statistics.median(o) * 1e3, statistics.median(n) * 1e3
    print(f"{name} {program.name}: old {old_ms:.3f} ms, new {new_ms:.3f} ms, "
          f"new/old {new_ms / old_ms:.3f}")
