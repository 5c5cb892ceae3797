"""What Triton's interpreter costs on CPU: one training step (forward + backward)
per zoo model, eager PyTorch against retrograd's standalone face.

Variants, each on its own copy of the model, same inputs:

- ``eager``: the model in PyTorch;
- ``retrograd fx``: ``retrograd.compile(model, executor="fx")``, the optimized
  program run with torch ops (passes, no Triton): the cost of the program
  itself without the interpreter;
- ``retrograd``: ``retrograd.compile(model, executor="interpret")``: the
  generated Triton kernels under Triton's interpreter (``TRITON_INTERPRET``),
  what ``executor="auto"`` ran on CPU before the torch program became the
  CPU default (benchmarks/cpu_step.py measures that default).

The first call of a compiled variant compiles (timed apart as "first call",
with an empty kernel cache in a temporary folder);
then ``--warmup`` untimed steps and ``--repeats`` timed ones; the median and
the spread (min, max) of the timed steps are printed (median, fastest in
parentheses: on a shared machine the fastest is the least disturbed) and written as JSON with
the date, machine and versions. Triton kernel counts come from the reports.

    python benchmarks/interpreter_cost.py [--models mlp gpt2_tiny] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# an empty kernel cache, so that the first call's time includes building the kernels
os.environ["RETROGRAD_CACHE_DIR"] = tempfile.mkdtemp(prefix="retrograd-interpreter-cost-")

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import retrograd
from retrograd.environment import git_commit
from zoo import ZOO, clone_inputs

VARIANTS = ("eager", "retrograd fx", "retrograd")


def _build(entry, variant: str):
    """A fresh model for ``variant``: eager, or compiled with the matching executor."""
    torch.manual_seed(0)
    model = entry.model()
    if variant == "eager":
        return model
    executor = "fx" if variant == "retrograd fx" else "interpret"
    return retrograd.compile(model, executor=executor)


def _step(entry, model, inputs) -> float:
    """Seconds of one forward + backward on fresh copies of ``inputs``."""
    copies = clone_inputs(inputs)
    start = time.perf_counter()
    entry.run(model, copies).backward()
    return time.perf_counter() - start


def _triton_kernels(model) -> int | None:
    reports = getattr(model, "reports", None)
    if not reports:
        return None
    return sum(report["kernels"]["triton"] for report in reports.values())


def measure(name: str, warmup: int, repeats: int) -> dict:
    """Every variant's step times on zoo model ``name``."""
    entry = ZOO[name]
    torch.manual_seed(1)
    inputs = entry.inputs()
    row = {"model": name}
    for variant in VARIANTS:
        model = _build(entry, variant)
        first = _step(entry, model, inputs)
        for _ in range(warmup):
            _step(entry, model, inputs)
        times = [_step(entry, model, inputs) for _ in range(repeats)]
        row[variant] = {"first_call_s": first, "median_s": statistics.median(times),
                        "min_s": min(times), "max_s": max(times),
                        "triton_kernels": _triton_kernels(model)}
    return row


def _environment() -> dict:
    """Date, machine, versions and the code measured (commit; local changes said)."""
    import triton
    from retrograd.environment import fields
    return {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
            "cpu": dict(fields())["CPU"], "code": git_commit(ROOT),
            "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "cuda": torch.cuda.is_available(),
            "torch_threads": torch.get_num_threads(),
            "load_average_1_5_15_min": os.getloadavg()}


def _finish(before: dict, rows: list[dict], out: Path | None) -> None:
    """Print the load average before and after the run, and write ``rows`` with
    the environment (``before``, plus the load after) to ``out`` as JSON."""
    print(f"load average (1, 5, 15 min) before: {before['load_average_1_5_15_min']}, "
          f"after: {os.getloadavg()}")
    if out is not None:
        environment = dict(before, load_average_after=os.getloadavg())
        out.write_text(json.dumps({"environment": environment, "rows": rows}, indent=2) + "\n")


def _print(rows: list[dict]) -> None:
    """Markdown rows: median (fastest) step in ms per variant, the ratio of medians."""
    print("| model | Triton kernels (fwd+bwd) | eager | retrograd fx | retrograd (interpreter) "
          "| interpreter vs eager | first call (compile) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        cells = [f"{row[v]['median_s'] * 1e3:.2f} ({row[v]['min_s'] * 1e3:.2f}) ms"
                 for v in VARIANTS]
        ratio = row["retrograd"]["median_s"] / row["eager"]["median_s"]
        print(f"| {row['model']} | {row['retrograd']['triton_kernels']} | {' | '.join(cells)} "
              f"| {ratio:.0f}x | {row['retrograd']['first_call_s']:.1f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "attention_block",
                                                        "gpt2_tiny"], choices=sorted(ZOO))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch's intra-op threads (1: on a shared machine, a busy core "
                             "stalls every multi-threaded op at its barrier)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if torch.cuda.is_available():
        sys.exit("interpreter_cost.py measures the CPU interpreter: run it without CUDA "
                 "(CUDA_VISIBLE_DEVICES=)")
    before = _environment()
    rows = [measure(name, args.warmup, args.repeats) for name in args.models]
    _print(rows)
    _finish(before, rows, args.out)


if __name__ == "__main__":
    main()
