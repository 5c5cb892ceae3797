"""``memory_budget``'s floor and peak guard (``passes/planning/budget.py``).

- The predicted peak of the chosen plan never rises as the budget tightens
  along ``budget.LADDER`` (exact solver) and over a sweep under the list's
  greedy, unless the stats say the guard could not hold (random pairs of
  budgets: tests/test_budget_pairs.py).
- A plan the exact solver finds for a tighter budget that would peak above a
  looser budget's plan is rejected, and the stats say so with both peaks.
- The predicted peak counts a recomputed chain as it runs (each value freed
  after its reader), not as every value of the chain alive at once.
- A budget below the floor (what the backward needs and cannot recompute)
  warns with the floor in bytes and as a fraction; the stats (and so the
  report) record the floor under every budget.

Joint graphs are the zoo's, as tests/test_checkpoint.py builds them.
"""

from __future__ import annotations

import copy
import itertools
import math
import re

import pytest
import retrograd
import torch
from retrograd.passes import checkpoint
from retrograd.passes.planning import budget, ledger, remat
from test_checkpoint import DropoutMLP, analysed, captured, context, dropout_joint, place

GREEDY_BUDGETS = (1.0, 0.9, 0.75, 0.6, 0.5, 0.4, 0.3, 0.25, 0.15, 0.1)


def _peaks(name: str, budgets) -> list[tuple[float, int, dict]]:
    rows = []
    for fraction in budgets:
        _, stats, caught = place(name, memory_budget=fraction)
        assert not caught, caught
        assert stats["saved_activation_bytes"] <= fraction * stats["save_all_bytes"]
        rows.append((fraction, stats["predicted_peak_bytes"], stats["peak_guard"]))
    return rows


def _assert_non_increasing(rows, may_break: int = 0) -> None:
    """Each tighter budget's predicted peak is at most the looser one's,
    except at budgets whose stats say no plan within them could keep it
    (``monotone: false``; at most ``may_break`` of those)."""
    broken = [tighter for tighter, _, guard in rows if not guard["monotone"]]
    assert len(broken) <= may_break, broken
    for (looser, peak, _), (tighter, peak_now, guard) in itertools.pairwise(rows):
        if guard["monotone"]:
            assert peak_now <= peak, \
                f"memory_budget={tighter} predicts {peak_now} > {looser}: {peak}"


@pytest.mark.parametrize(("name", "may_break"),
                         [("mlp", 0), ("cnn", 0), ("attention_block", 1), ("gpt2_tiny", 1)])
def test_predicted_peak_never_rises_along_the_ladder(name, may_break):
    """attention_block at 0.25: every plan within it predicts more than the
    plan at 0.5 (its recomputed values live in the backward while the saved
    ones they replace are freed early), and the guard says it cannot hold:
    measured, the step peaks at 16,712 bytes against 15,048 at 0.5
    (tests/test_peak_prediction.py). gpt2_tiny at 0.25 since the descent
    (``budget_descent.py``): it brings 0.75 and 0.5 down to 124,036
    predicted (the exact solver's plans: 143,492 and more), below what any
    plan within 0.25 it finds predicts (134,404, still under 1.0's 139,588)."""
    _assert_non_increasing(_peaks(name, budget.LADDER), may_break)


@pytest.mark.parametrize(("name", "may_break"), [("mlp", 1), ("attention_block", 5)])
def test_predicted_peak_never_rises_under_the_greedy(name, may_break, monkeypatch):
    """attention_block from 0.4 down: every plan of the list within it
    predicts more than the plan at 0.5, so the guard says it cannot hold
    (as at 0.25 on the ladder)."""
    monkeypatch.setattr(checkpoint, "EXACT_LIMIT", 0)
    _assert_non_increasing(_peaks(name, GREEDY_BUDGETS), may_break)


def _ilp_peak(name: str, fraction: float) -> int:
    info, policy = analysed(name)
    save_all = remat.plan_bytes(info, remat.save_all_plan(info).saved)
    plan = remat.ilp_plan(info, fraction * save_all, policy.any, policy.forced_recompute)
    return ledger.predicted_peak(captured(name).joint.graph, info, plan.saved, plan.recomputed)


def test_a_plan_peaking_above_a_looser_budgets_is_rejected():
    """On gpt2_tiny the least-cost plan at 0.8 (the ILP's) predicts a higher
    peak than the plan at 0.9: the guard keeps a costlier one that does not,
    and its stats name the levels where the solver's plan was rejected. (The
    MLP at 0.3 against 0.5 was the case until saved values were counted
    freed after their last backward reader.)"""
    looser = place("gpt2_tiny", memory_budget=0.9)[1]
    exact = _ilp_peak("gpt2_tiny", 0.8)
    assert exact > looser["predicted_peak_bytes"], "the case no longer arises; pick another"
    stats = place("gpt2_tiny", memory_budget=0.8)[1]
    assert stats["predicted_peak_bytes"] <= looser["predicted_peak_bytes"]
    rejected = stats["peak_guard"]["rejected"]
    assert rejected and all(r["why"] == "predicted peak" and r["solver_peak_bytes"] > r["cap_bytes"]
                            and 0.8 <= r["memory_budget"] < 0.9 for r in rejected), rejected
    assert stats["recompute_cost"] >= looser["recompute_cost"]
    assert stats["saved_activation_bytes"] <= looser["saved_activation_bytes"]


def test_a_recomputed_chain_is_not_counted_alive_all_at_once():
    """The MLP's GELU backward recomputes seven pointwise values for one
    reader; counted all alive at that reader, the plan at 0.5 predicted
    3,892 bytes against 2,580 at 0.75."""
    assert _ilp_peak("mlp", 0.5) <= _ilp_peak("mlp", 0.75)


def test_a_budget_below_the_floor_warns_with_the_floor_in_bytes_and_as_a_fraction():
    """The dropout's seed (8 bytes) is never recomputed: the floor."""
    subject = dropout_joint()
    save_all = place(subject, memory_budget=1.0)[1]["save_all_bytes"]
    floor = {"bytes": 8, "fraction": math.ceil(8 / save_all * 1e4) / 1e4}
    with pytest.warns(UserWarning, match="budget floor") as record:
        _, stats = checkpoint.run(copy.deepcopy(subject.joint),
                                  context(subject.count, memory_budget=4 / save_all))
    [message] = [str(w.message) for w in record if "retrograd" in str(w.message)]
    fraction, total = re.search(r"budget floor: ([0-9.]+) of the save-all plan's (\d+) bytes",
                                message).groups()
    assert (float(fraction), int(total)) == (floor["fraction"], save_all)
    assert "smallest plan saves 8 bytes" in message
    assert stats["budget_floor"] == floor and stats["saved_activation_bytes"] == 8
    _, at_floor, caught = place(subject, memory_budget=floor["fraction"])
    assert not caught and at_floor["budget_floor"] == floor
    assert at_floor["saved_activation_bytes"] <= floor["fraction"] * save_all


def test_the_floor_and_predicted_peak_reach_the_report():
    torch.manual_seed(0)
    model = DropoutMLP()
    compiled = retrograd.compile(lambda x: model(x)[0].sum(), memory_budget=0.001,
                                 executor="fx")
    with pytest.warns(UserWarning, match="budget floor"):
        compiled(torch.randn(16, 8)).backward()
    [stats] = [p["stats"] for p in compiled.reports["forward"]["passes"]
               if p["name"] == "checkpoint"]
    assert stats["budget_floor"]["bytes"] == stats["saved_activation_bytes"] > 0
    assert 0 < stats["budget_floor"]["fraction"] <= 1
    assert stats["predicted_peak_bytes"] > 0
