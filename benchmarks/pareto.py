"""``memory_budget`` measured: what each budget really keeps and peaks at.

For each model and budget, in a fresh process after two warm-up steps:

- saved bytes, measured: the distinct storages autograd keeps for the
  backward (``saved_tensors_hooks``, parameters, buffers and inputs left
  out; ``measuring.saved_storage_bytes``), and that figure over the same
  measurement of torch's ``default_partition`` (``aot_eager_default_partitioner``:
  save everything the backward reads), the denominator ``memory_budget``
  promises to hold;
- saved bytes, planned: the checkpoint pass's own figure (every graph's
  forward report, summed);
- recompute FLOPs beyond eager's (the reports' ``recompute.flops``);
- predicted peak: the pass's graph-level estimate for the chosen plan
  (the checkpoint stats' ``predicted_peak_bytes``; the largest over the
  graphs), beside the measured step peak (``torch.profiler`` allocation
  events, ``measuring.profiled_peak``);
- the peak guard (``passes/planning/budget.py``): how many solver plans it
  rejected for peaking above a looser budget's, and whether it held; and
  the budget floor as a fraction.

After the table, per model, whether the measured and the predicted peak
stayed level or fell at each step of 1.0 -> 0.75 -> 0.5 -> 0.25.

Models: transformers' GPT-2, LLaMA and BERT from ``tests/hf_zoo.py`` with
library defaults (SDPA attention), and ``lm_wide``, a logits-dominated GPT-2
(vocabulary 4096 = 128 x width 32, ``lm_loss_memory.py``'s model). The loss
is the model's own, the compiled function returns it alone.

    python benchmarks/pareto.py [--models gpt2 lm_wide] [--out rows.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import multiprocessing
import sys
import tempfile
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = (None, 1.0, 0.75, 0.5, 0.25)
MODELS = ("gpt2", "llama", "bert", "lm_wide")


def _paths() -> None:
    for folder in ("tests", "benchmarks"):
        if str(ROOT / folder) not in sys.path:
            sys.path.insert(0, str(ROOT / folder))


def model_and_batch(name: str):
    """A fresh model (seeded) and its batch of keyword arguments."""
    _paths()
    if name == "lm_wide":
        from lm_loss_memory import _model_and_batch
        return _model_and_batch()
    from hf_zoo import HF_ZOO
    entry = HF_ZOO[name]
    model = entry.model()
    model.train(not entry.dropout(model))     # dropout off where the defaults have it
    for suffix in ("ForCausalLM", "ForMaskedLM"):   # transformers' one-time warning about
        if type(model).__name__.endswith(suffix):    # an unset loss_type breaks dynamo's graph
            model.loss_type = suffix
    return model, entry.batch()


def _compiled(label: str, loss, budget, dump_dir):
    import retrograd
    if label == "default_partition":
        return torch.compile(loss, backend="aot_eager_default_partitioner")
    return retrograd.compile(loss, memory_budget=budget, dump_dir=dump_dir)


def _reports(dump_dir: str) -> list[dict]:
    reports = [json.loads(p.read_text()) for p in Path(dump_dir).rglob("report.json")]
    return [r for r in reports if r.get("graph") == "forward"]


def measure(name: str, label: str, budget=None) -> dict:
    """One (model, compiler, budget) row; run in a fresh process."""
    _paths()
    from measuring import profiled_peak, saved_storage_bytes
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model, batch = model_and_batch(name)
    dump_dir = tempfile.mkdtemp(prefix="rg-pareto-")
    compiled = _compiled(label, lambda **kw: model(**kw).loss, budget, dump_dir)

    def run():   # the batch itself: a clone would be a storage the hooks count
        return compiled(**batch)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        run().backward()
    model.zero_grad(set_to_none=True)
    excluded = list(model.parameters()) + list(model.buffers()) + list(batch.values())
    row = {"model": name, "compiler": label, "memory_budget": budget,
           "saved_bytes": saved_storage_bytes(run, excluded)}
    model.zero_grad(set_to_none=True)
    row["peak_bytes"] = profiled_peak(lambda: run().backward())
    if label == "retrograd":
        row.update(_planned(_reports(dump_dir)))
    return row


def _planned(reports: list[dict]) -> dict:
    """What the checkpoint pass planned, over every graph: saved bytes,
    recompute FLOPs, the largest predicted peak, the peak guard's rejections
    and whether it held, the budget floor (largest fraction)."""
    stats = [p["stats"] for r in reports for p in r["passes"] if p["name"] == "checkpoint"]
    guards = [s["peak_guard"] for s in stats if s.get("peak_guard")]
    floors = [s["budget_floor"] for s in stats if s.get("budget_floor")]
    return {
        "planned_saved_bytes": sum(r["memory"]["saved_activation_bytes"] or 0 for r in reports),
        "recompute_flops": sum(r["recompute"]["flops"] or 0 for r in reports),
        "predicted_peak_bytes": max((s["predicted_peak_bytes"] for s in stats
                                     if s.get("predicted_peak_bytes") is not None), default=None),
        "guard_rejected": sum(len(g["rejected"]) for g in guards) if guards else None,
        "guard_monotone": all(g["monotone"] for g in guards) if guards else None,
        "budget_floor_fraction": max((f["fraction"] for f in floors), default=None),
        "graphs": len(reports)}


def isolated(name: str, label: str, budget=None) -> dict:
    """``measure`` in a fresh Python process (dynamo and caches start clean)."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(measure, name, label, budget).result()


def rows_for(name: str) -> list[dict]:
    """The default_partition row, then retrograd's row per budget."""
    rows = [isolated(name, "default_partition")]
    rows += [isolated(name, "retrograd", budget) for budget in BUDGETS]
    for row in rows:
        print(json.dumps(row), file=sys.stderr)   # progress: the table prints at the end
    return rows


def markdown(rows: list[dict]) -> str:
    """The Pareto table: budget -> saved bytes (measured, planned, ratio to
    default_partition's measured), recompute FLOPs, predicted and measured peak."""
    header = ("| model | memory_budget | saved bytes (measured) | x default_partition | "
              "saved bytes (planned) | recompute FLOPs | predicted peak | measured peak | "
              "guard rejected (held) |")
    lines = [header,
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    base = {r["model"]: r for r in rows if r["compiler"] == "default_partition"}
    for r in rows:
        denominator = base[r["model"]]["saved_bytes"]
        if r["compiler"] == "default_partition":
            lines.append(f"| {r['model']} | default_partition | {r['saved_bytes']:,} | 1.00 | "
                         f"| | | {r['peak_bytes']:,} | |")
            continue
        predicted = r["predicted_peak_bytes"]
        lines.append(
            f"| {r['model']} | {r['memory_budget']} | {r['saved_bytes']:,} | "
            f"{r['saved_bytes'] / denominator:.3f} | {r['planned_saved_bytes']:,} | "
            f"{r['recompute_flops']:,} | {'' if predicted is None else f'{predicted:,}'} | "
            f"{r['peak_bytes']:,} | {_guard(r)} |")
    return "\n".join(lines + [""] + monotonicity(rows))


def _guard(row: dict) -> str:
    if row.get("guard_rejected") is None:
        return ""
    return f"{row['guard_rejected']} ({'yes' if row['guard_monotone'] else 'no'})"


def monotonicity(rows: list[dict], budgets=(1.0, 0.75, 0.5, 0.25)) -> list[str]:
    """Per model: does each peak stay level or fall along ``budgets``? Names
    each step where it rose, and by how many bytes."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        by_budget = {r["memory_budget"]: r for r in rows
                     if r["model"] == model and r["compiler"] == "retrograd"}
        steps = [(a, b) for a, b in itertools.pairwise(budgets) if a in by_budget and b in by_budget]
        for key, label in (("peak_bytes", "measured"), ("predicted_peak_bytes", "predicted")):
            rises = [f"{a} -> {b}: +{by_budget[b][key] - by_budget[a][key]:,}" for a, b in steps
                     if None not in (by_budget[a][key], by_budget[b][key])
                     and by_budget[b][key] > by_budget[a][key]]
            verdict = "never rises" if not rises else "rises at " + ", ".join(rises)
            lines.append(f"- {model}, {label} peak over {' -> '.join(map(str, budgets))}: "
                         f"{verdict}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    rows = [row for name in args.models for row in rows_for(name)]
    print(markdown(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
