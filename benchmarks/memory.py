"""Saved activation bytes between forward and backward, per zoo model, for
eager autograd, torch's two partitioners and retrograd's plans (CPU,
deterministic figures).

- eager: what autograd saves, seen by ``torch.autograd.graph.saved_tensors_hooks``
  (unique storages, parameters and inputs left out);
- torch default_partition / min_cut_rematerialization_partition, and
  retrograd's default and ``memory_budget`` 0.75 / 0.5 / 0.25, all run on the
  same joint graph (retrograd's decompositions, after its cleanup pass), with
  bytes counted the same way (``retrograd.passes.checkpoint.saved_values``);
- recompute FLOPs for each plan (retrograd's cost model, ``passes/planning/remat.py``).

and, second table, the measured peak of live CPU memory during one training
step (forward + backward) from ``torch.profiler`` memory events, for eager,
``torch.compile(backend="aot_eager")`` and retrograd; third table, a whole
step with SGD (momentum) for an eager loop, ``torch.compile`` + the eager
optimizer, and ``retrograd.compile_step``; fourth, the Pareto table of
``memory_budget`` (``benchmarks/pareto.py``: per budget the measured saved
bytes against torch's default_partition measured the same way, recompute
FLOPs, predicted and measured peak) on transformers' GPT-2, LLaMA and BERT
and an LLM-shaped GPT-2 (vocabulary 128x its width). Every row of the second
to fourth tables is measured in a fresh process.

    python benchmarks/memory.py [--out results.json] [--pareto-models gpt2 lm_wide]
"""

from __future__ import annotations

import argparse
import warnings as _warnings
import copy
import json
import sys
import warnings
from pathlib import Path

import torch
from torch._functorch.partitioners import (default_partition,
                                           min_cut_rematerialization_partition)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import pareto  # noqa: E402
from measuring import profiled_peak, saved_storage_bytes  # noqa: E402
from zoo import ZOO, ZooEntry, _weighted_sum, clone_inputs  # noqa: E402  (the zoo lives with the tests)

from retrograd import loss_ops  # noqa: E402
from retrograd.capture import joint_graph  # noqa: E402
from retrograd.dump import Dumper  # noqa: E402
from retrograd.options import Options  # noqa: E402
from retrograd.passes import checkpoint, cleanup  # noqa: E402
from retrograd.passes.planning import remat  # noqa: E402
from retrograd.pipeline import OpSupport, PassContext  # noqa: E402

BUDGETS = (None, 0.75, 0.5, 0.25)


class DropoutMLP(torch.nn.Module):
    """Linear -> GELU -> dropout(0.1) -> Linear: a mask to save or to recompute."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.down(torch.nn.functional.dropout(torch.nn.functional.gelu(self.up(x)), 0.1,
                                                     self.training))


#: The zoo, and a model with dropout (not in the zoo: its gradients cannot be
#: compared with eager's, which draws other masks; its memory can).
MODELS = {**ZOO, "mlp_dropout": ZooEntry(
    "mlp_dropout", model=DropoutMLP, inputs=lambda: (torch.randn(4, 8, requires_grad=True),),
    loss=_weighted_sum)}
_warnings.filterwarnings("ignore", category=FutureWarning)


class LossOf(torch.nn.Module):
    """A zoo entry's model and loss as one module returning ``(loss,)``."""

    def __init__(self, entry, model):
        super().__init__()
        self.entry, self.model = entry, model

    def forward(self, *inputs):
        return (self.entry.run(self.model, inputs),)


def eager_saved_bytes(entry, model, inputs) -> int:
    """Unique storages autograd saves, leaving out parameters and inputs."""
    excluded = list(model.parameters()) + list(model.buffers()) + [
        i for i in inputs if isinstance(i, torch.Tensor)]
    return saved_storage_bytes(lambda: entry.run(model, inputs), excluded)


def _recompute_flops(joint, forward, backward) -> int:
    forward_names = {n.name: n for n in joint.graph.nodes if n.op == "call_function"}
    return sum(remat.flops(forward_names[n.name]) for n in backward.graph.nodes
               if n.op == "call_function" and n.name in forward_names)


def measure(name: str) -> dict:
    entry = MODELS[name]
    torch.manual_seed(0)
    model, inputs = entry.model(), entry.inputs()
    row = {"model": name, "eager": eager_saved_bytes(entry, copy.deepcopy(model),
                                                      clone_inputs(inputs))}
    joint, joint_inputs, count = joint_graph(LossOf(entry, model), clone_inputs(inputs))
    context = PassContext(Options(), Dumper(None, []), OpSupport(), name)
    loss_ops.restore(joint, context)   # the loss ops the table holds back, decomposed as before
    cleanup.run(joint, context)
    for label, partition in (("torch default", default_partition),
                             ("torch min-cut", min_cut_rematerialization_partition)):
        forward, backward = partition(copy.deepcopy(joint), joint_inputs, num_fwd_outputs=count)
        _, activations = checkpoint.saved_values(forward, backward)
        row[label] = checkpoint._bytes(activations)
        row[f"{label} recompute flops"] = _recompute_flops(joint, forward, backward)
    for budget in BUDGETS:
        label = "retrograd" if budget is None else f"retrograd {budget}"
        ctx = PassContext(Options(memory_budget=budget), Dumper(None, []), OpSupport(), name,
                          num_fwd_outputs=count)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, stats = checkpoint.run(copy.deepcopy(joint), ctx)
        row[label] = stats["saved_activation_bytes"]
        row[f"{label} recompute flops"] = stats["recomputed_flops"]
        row[f"{label} solver"] = f"{stats['solver']}{'' if stats['optimal'] else ' (heuristic)'}"
        row["save_all_bytes"] = stats["save_all_bytes"]
    return row


def step_peak_bytes(entry, model, compiled, inputs) -> int:
    """Peak of live torch CPU memory during one forward+backward, from the
    profiler's allocation events (running sum of allocations minus frees).
    Warm-up steps first, so compilation and caches are not counted."""
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        entry.run(compiled, clone_inputs(inputs)).backward()
    model.zero_grad(set_to_none=True)
    fresh = clone_inputs(inputs)
    return profiled_peak(lambda: entry.run(compiled, fresh).backward())


def measure_peaks(name: str) -> dict:
    """Measured peak of one training step: eager, aot_eager and retrograd."""
    import retrograd
    entry = MODELS[name]
    row = {"model": name}
    for label in ("eager", "aot_eager", "retrograd"):
        torch.manual_seed(0)
        torch._dynamo.reset()
        model, inputs = entry.model(), entry.inputs()
        compiled = {"eager": model, "aot_eager": torch.compile(model, backend="aot_eager"),
                    "retrograd": retrograd.compile(model)}[label]
        row[label] = step_peak_bytes(entry, model, compiled, inputs)
    return row


def measure_steps(name: str) -> dict:
    """A full training step with SGD (momentum): an eager loop, torch.compile of
    the model with the same optimizer, and retrograd.compile_step; measured
    peak after warm-up, and the Triton kernels compile_step launches."""
    import retrograd
    entry = MODELS[name]
    row = {"model": name}
    for label in ("eager loop", "torch.compile + optimizer", "compile_step"):
        torch.manual_seed(0)
        torch._dynamo.reset()
        model, inputs = entry.model(), entry.inputs()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        if label == "compile_step":
            step = retrograd.compile_step(model, lambda m, *b: entry.run(m, b), optimizer)

            def run():
                step(*clone_inputs(inputs))
        else:
            compiled = model if label == "eager loop" else torch.compile(model)

            def run():
                optimizer.zero_grad(set_to_none=True)
                entry.run(compiled, clone_inputs(inputs)).backward()
                optimizer.step()
        for _ in range(2):
            run()
        row[label] = profiled_peak(run)
        if label == "compile_step":
            row["compile_step kernels"] = step.reports["step"]["kernels"]["triton"]
    return row


def step_markdown(rows: list[dict]) -> str:
    lines = ["| model | eager loop | torch.compile + optimizer | compile_step | "
             "compile_step Triton kernels |", "| --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['eager loop']:,} | "
                     f"{row['torch.compile + optimizer']:,} | {row['compile_step']:,} | "
                     f"{row['compile_step kernels']} |")
    return "\n".join(lines)


def peak_markdown(rows: list[dict]) -> str:
    lines = ["| model | eager | aot_eager | retrograd | retrograd vs eager |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['eager']:,} | {row['aot_eager']:,} | "
                     f"{row['retrograd']:,} | {row['retrograd'] / row['eager']:.2f}x |")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    columns = ["eager", "torch default", "torch min-cut", "retrograd"] + [
        f"retrograd {b}" for b in BUDGETS if b is not None]
    lines = ["| model | save-all plan | " + " | ".join(columns) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in columns) + " |"]
    for row in rows:
        cells = []
        for column in columns:
            flops = row.get(f"{column} recompute flops")
            cells.append(f"{row[column]:,}" + (f" ({flops:,} fl)" if flops else ""))
        lines.append(f"| {row['model']} | {row['save_all_bytes']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def isolated(function, name: str) -> dict:
    """``function(name)`` in a fresh Python process: compilers keep global
    state (dynamo, Inductor's caches and configs), and a row measured after
    other models' rows was seen to differ from the same row measured alone."""
    import concurrent.futures
    import multiprocessing
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(function, name).result()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--pareto-models", nargs="*", default=list(pareto.MODELS))
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    rows = [measure(name) for name in args.models]
    peaks = [isolated(measure_peaks, name) for name in args.models]
    steps = [isolated(measure_steps, name) for name in args.models]
    budgets = [row for name in args.pareto_models for row in pareto.rows_for(name)]
    if args.out:
        Path(args.out).write_text(json.dumps({"saved": rows, "peak": peaks, "step": steps,
                                              "pareto": budgets}, indent=2))
    print(markdown(rows))
    print()
    print(peak_markdown(peaks))
    print()
    print(step_markdown(steps))
    print()
    print(pareto.markdown(budgets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
