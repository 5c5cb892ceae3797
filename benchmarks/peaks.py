"""Measured peak of a training step on CPU, every face against eager and
Inductor, for the models where retrograd's peak trailed (issue 13, item 3):
the zoo's CNN and its LoRA fine-tune (frozen base, adapters on attention).

Two tables, each cell the peak of live torch CPU memory from the profiler's
allocation events (``measuring.profiled_peak``), after two warm-up steps,
each cell in a fresh process (compilers keep global state):

- forward + backward: eager, ``torch.compile`` (Inductor),
  ``torch.compile(backend="retrograd")`` and ``retrograd.compile``;
- a whole step with SGD (momentum 0.9) over the trainable parameters: an
  eager loop, Inductor + the eager optimizer, the retrograd backend + the
  eager optimizer, and ``retrograd.compile_step``.

    python benchmarks/peaks.py [--models cnn lora] [--executor interpret] [--out results.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from measuring import profiled_peak
from zoo import ZOO, clone_inputs

FORWARD_BACKWARD = ("eager", "inductor", "retrograd backend", "retrograd.compile")
STEP = ("eager loop", "inductor + optimizer", "retrograd backend + optimizer", "compile_step")


def _options(executor: str | None) -> dict:
    return {} if executor is None else {"executor": executor}


def _compiled(label: str, model, executor: str | None):
    """The callable of one forward+backward column."""
    import retrograd
    if label in ("eager", "eager loop"):
        return model
    if label.startswith("inductor"):
        return torch.compile(model)
    if label.startswith("retrograd backend"):
        options = _options(executor)
        return torch.compile(model, backend="retrograd", **({"options": options} if options
                                                            else {}))
    return retrograd.compile(model, **_options(executor))


def _runner(name: str, label: str, executor: str | None = None):
    """``(run, inputs)``: ``run(batch)`` runs one step of ``label`` on model
    ``name``; ``inputs`` are the example inputs to copy a batch from."""
    import retrograd
    entry = ZOO[name]
    torch.manual_seed(0)
    torch._dynamo.reset()
    model, inputs = entry.model(), entry.inputs()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if label in FORWARD_BACKWARD:
        compiled = _compiled(label, model, executor)

        def run(batch):
            model.zero_grad(set_to_none=True)
            entry.run(compiled, batch).backward()
        return run, inputs
    optimizer = torch.optim.SGD(trainable, lr=0.01, momentum=0.9)
    if label == "compile_step":
        step = retrograd.compile_step(model, lambda m, *batch: entry.run(m, batch), optimizer,
                                      **_options(executor))
        return (lambda batch: step(*batch)), inputs
    compiled = _compiled(label, model, executor)

    def run(batch):
        optimizer.zero_grad(set_to_none=True)
        entry.run(compiled, batch).backward()
        optimizer.step()
    return run, inputs


def measure(name: str, label: str, executor: str | None = None) -> int:
    """Peak bytes of one step after two warm-up steps (run in a fresh process).
    The batch is copied before the profiler starts: the caller holds it, as
    in benchmarks/memory.py."""
    warnings.simplefilter("ignore")
    run, inputs = _runner(name, label, executor)
    for _ in range(2):
        run(clone_inputs(inputs))
    batch = clone_inputs(inputs)
    return profiled_peak(lambda: run(batch))


def isolated(name: str, label: str, executor: str | None = None) -> int:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(measure, name, label, executor).result()


def table(rows: list[dict], columns: tuple) -> str:
    lines = ["| model | " + " | ".join(columns) + " |",
             "| --- | " + " | ".join("---:" for _ in columns) + " |"]
    for row in rows:
        base = row[columns[0]]
        lines.append(f"| {row['model']} | " + " | ".join(
            f"{row[c]:,} ({row[c] / base:.2f}x)" for c in columns) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["cnn", "lora"])
    parser.add_argument("--columns", nargs="*", default=None,
                        help="measure only these columns (default: all)")
    parser.add_argument("--executor", default=None,
                        help="retrograd's executor option (default: retrograd's default)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    results = {}
    for title, columns in (("forward+backward", FORWARD_BACKWARD), ("step", STEP)):
        columns = tuple(c for c in columns if args.columns is None or c in args.columns)
        if not columns:
            continue
        rows = [{"model": name, **{c: isolated(name, c, args.executor) for c in columns}}
                for name in args.models]
        results[title] = rows
        print(f"## {title}\n\n{table(rows, columns)}\n", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
