"""``memory_budget`` held when measured, not only in the planner's own bytes.

The promise: with ``memory_budget=f`` the distinct storages autograd keeps
for the backward (``saved_tensors_hooks``, parameters, buffers and inputs
left out) are at most ``f`` times what torch's ``default_partition`` keeps,
measured the same way on the same model (``aot_eager_default_partitioner``:
save everything the backward reads). Measured on a transformers model with
library defaults (SDPA attention), and the planner's figure must be the
measured one. ``SLACK``: the planner's save-everything plan is formed on
retrograd's decomposed joint graph, not on the graph torch partitions, and
the two differ by a few bytes (20 bytes of 83,396 on the zoo's LLaMA: the
loss's target and mask saved at other shapes); 0.5% covers that and nothing
of the size of an activation.
"""

from __future__ import annotations

import itertools
import sys
import warnings
from pathlib import Path

import pytest
import retrograd
import torch
from hf_zoo import HF_ZOO
from retrograd.passes.planning import budget

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from measuring import profiled_peak, saved_storage_bytes

SLACK = 0.005


def _model(name: str):
    entry = HF_ZOO[name]
    model = entry.model()
    model.train(not entry.dropout(model))
    return model, entry.batch()


def _measured(name: str, make) -> tuple[int, int, object]:
    """(saved bytes, step peak, compiled) of ``make(loss function)`` after a
    warm-up step: distinct saved storages as benchmarks/measuring.py counts
    them, and the profiler's peak of one forward + backward."""
    torch._dynamo.reset()
    model, batch = _model(name)
    compiled = make(lambda **kw: model(**kw).loss)

    def run():   # the batch itself: a clone would be a storage the hooks count
        return compiled(**batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run().backward()
        model.zero_grad(set_to_none=True)
        excluded = list(model.parameters()) + list(model.buffers()) + list(batch.values())
        saved = saved_storage_bytes(run, excluded)
        model.zero_grad(set_to_none=True)
        peak = profiled_peak(lambda: run().backward())
    torch._dynamo.reset()
    return saved, peak, compiled


def _checkpoint_stats(compiled) -> dict:
    [stats] = [p["stats"] for p in compiled.reports["forward"]["passes"]
               if p["name"] == "checkpoint"]
    return stats


@pytest.mark.parametrize("name", ["gpt2"])
def test_budget_half_keeps_at_most_half_of_default_partitions_measured_bytes(name):
    """Before storages were counted, GPT-2 at 0.5 kept 0.57x: the query, key
    and value views of one projection were counted at a third of the storage
    they keep, fills and the backward's tangent-free values (eager makes them
    in the backward) sat in the save-everything plan."""
    everything, _, _ = _measured(name, lambda f: torch.compile(
        f, backend="aot_eager_default_partitioner"))
    saved, _, compiled = _measured(name, lambda f: retrograd.compile(f, memory_budget=0.5))
    assert saved <= 0.5 * everything * (1 + SLACK), (saved, everything, saved / everything)
    stats = _checkpoint_stats(compiled)
    assert stats["saved_activation_bytes"] == saved, "the plan's bytes are the measured ones"
    assert stats["save_all_bytes"] <= everything * (1 + SLACK)



@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_measured_peak_never_rises_along_the_ladder(name):
    """The peak guard works on the predicted peak (passes/planning/budget.py);
    here the profiler's step peak of GPT-2 at 1.0, 0.75, 0.5, 0.25, beside
    the prediction: neither rises as the budget tightens. Each budget in a
    fresh process (``benchmarks/pareto.py``'s ``isolated``): measured one
    after another in one process, 0.75 peaked 1,416 bytes above 1.0, a
    figure of the process's history, not of the plan (fresh: 143,828 and
    132,744). After 2769b46 it failed: 0.25 measured 129,392 bytes against
    0.5's 129,320, the prediction counting recomputed views (``view_11``,
    ``permute_26``) apart from their base and GELU's backward chain, which
    the program computes in place, as a new value per step. BERT failed
    until the peak guard's descent (``budget_descent.py``): 0.5 measured
    100,040 against 0.75's 99,848 (its saved norm statistics alive at a
    weight gradient's matmul the prediction did not see as the peak)."""
    import pareto
    rows = [(fraction, row["peak_bytes"], row["predicted_peak_bytes"]) for fraction in
            budget.LADDER for row in [pareto.isolated(name, "retrograd", fraction)]]
    for (looser, *before), (tighter, *after) in itertools.pairwise(rows):
        assert after[0] <= before[0], f"measured: {tighter} peaks above {looser}: {rows}"
        assert after[1] <= before[1], f"predicted: {tighter} peaks above {looser}: {rows}"
