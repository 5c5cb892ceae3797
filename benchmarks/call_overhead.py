"""The standalone face's own work per call, apart from the program it runs.

``retrograd.compile(model)`` flattens each call's arguments, makes its cache
key (signature, call structure, module state), checks the kept program's
guards, calls AOTAutograd's compiled function and rebuilds the output
(compiler/trace_cache.py). This script times that work alone: per call,
this thread's CPU time (``time.thread_time``) around the compiled module's
call, minus the time inside AOTAutograd's compiled function (the program,
and the autograd runtime around it: retrograd's lean one,
``compiler/lean_runtime.py``, or AOTAutograd's wrappers). CPU time leaves
out the time other jobs held the core on a shared machine; the median of
``--calls`` calls is printed, the fastest of ``--rounds`` such medians
kept. Forward calls with autograd on, as in a training step; the default
CPU executor (the torch program).

    python benchmarks/call_overhead.py [--models mlp lora] [--out results.json]
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

os.environ.setdefault("RETROGRAD_CACHE_DIR", tempfile.mkdtemp(prefix="retrograd-overhead-"))

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import retrograd
from zoo import ZOO, clone_inputs

MODELS = ["mlp", "cnn", "attention_block", "gpt2_tiny", "lora", "mlp_frozen"]


class _Inside:
    """AOTAutograd's compiled function of the kept entry, timed."""

    def __init__(self, entry):
        self.spent = 0.0
        self.compiled = entry.compiled
        entry.compiled = self

    def __call__(self, *tensors):
        start = time.thread_time()
        try:
            return self.compiled(*tensors)
        finally:
            self.spent += time.thread_time() - start


def measure(name: str, calls: int, rounds: int) -> dict:
    """Median seconds per call outside AOTAutograd's function, and inside it."""
    entry = ZOO[name]
    torch.manual_seed(0)
    model = entry.model()
    compiled = retrograd.compile(model)
    inputs = clone_inputs(entry.inputs())
    entry.run(compiled, inputs).backward()   # compiles
    inside = _Inside(compiled._cache.last)
    outside_medians, inside_medians = [], []
    for _ in range(rounds):
        outside, within = [], []
        for _ in range(calls):
            inside.spent = 0.0
            start = time.thread_time()
            entry.call(compiled, *inputs)   # as the step calls it (gpt2_tiny: keywords)
            total = time.thread_time() - start
            outside.append(total - inside.spent)
            within.append(inside.spent)
        outside_medians.append(statistics.median(outside))
        inside_medians.append(statistics.median(within))
    return {"model": name, "outside_s": min(outside_medians),
            "inside_s": min(inside_medians), "outside_medians_s": outside_medians}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=sorted(ZOO))
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(name, args.calls, args.rounds) for name in args.models]
    print("| model | the face's own work per call | inside AOTAutograd's function |")
    print("| --- | ---: | ---: |")
    for row in rows:
        print(f"| {row['model']} | {row['outside_s'] * 1e6:.1f} us "
              f"| {row['inside_s'] * 1e6:.1f} us |")
    if args.out is not None:
        args.out.write_text(json.dumps({"torch": torch.__version__, "rows": rows,
                                        "load_average": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()
