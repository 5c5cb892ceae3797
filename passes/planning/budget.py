"""``memory_budget`` plans: the solver, the floor, and the peak guard.

``plan_for_budget`` turns ``memory_budget=f`` into a plan of the joint (or
step) graph in three steps.

1. **The solver** (``remat.ilp_plan`` up to the exact limit, else the
   cheapest plan of ``remat_search.tradeoff``'s list): least recompute cost
   with saved bytes <= ``f x save_all_bytes``.
2. **The floor**: the fewest bytes any plan saves, a min-cut in which every
   deterministic op may be recomputed. What it keeps is what the backward
   needs and cannot make again (a random draw's seed, an impure op, a
   ``save=`` value, the copy of an input the program writes). A budget below
   it cannot hold: the floor's plan is used and a warning names the floor in
   bytes and as a fraction of the save-all plan. The stats record it
   (``budget_floor``) under every budget, so a user sees the smallest budget
   worth asking for.
3. **The peak guard**: the measured step peak should not rise as the budget
   tightens, which Inductor's budget does not promise (pytorch issue 197838:
   a tighter ``activation_memory_budget`` measured a higher peak, because
   the recomputed values live in the backward too). retrograd cannot measure
   while compiling, so it holds the rule on its *predicted* peak
   (``ledger.predicted_peak``):

   **Rule.** Walk the budget levels from the loosest down to ``f``: the
   fractions of ``LADDER`` above ``f``, then ``f`` (when the solver is the
   list's greedy, also every fraction at which a listed plan starts to fit,
   so that every budget is a level of the same walk). A level's plan is the
   solver's plan there if it is *admissible*, else the cheapest admissible
   plan among the previous level's plan and the budget-independent list
   (the trade-off's frontier, the default min-cut plan, the floor).
   *Admissible* at level l: saved bytes <= l x save_all; a predicted peak
   no higher than the previous level's plan's and, below the default plan's
   own fraction, no higher than the default plan's (asking to save less
   than the default must not peak above it); no more saved bytes and no
   less recompute than the previous level's plan (so the budget stays
   monotone in both, as before). A solver plan that fails is *rejected*
   (the stats' ``peak_guard.rejected`` lists each, with its peak and the
   cap). If no plan is admissible, no plan within the budget keeps the
   peak from rising: the solver's plan stays (the least recompute) and
   ``peak_guard.monotone`` is false; trading recompute for a smaller rise
   is not what the budget asked for.

   What it guarantees: the predicted peak never rises from one ``LADDER``
   budget to a tighter one, nor from a ``LADDER`` budget to any tighter
   budget; under the list's greedy, between any two budgets. Two budgets
   strictly between neighbouring ``LADDER`` fractions both solved by the
   ILP are not compared (the looser one's exact plan is not a level of the
   tighter one's walk). The cost: one exact solve per ``LADDER`` fraction
   above ``f``, and the trade-off search when a plan is rejected.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

from retrograd.passes.planning import ledger, remat, remat_search

__all__ = ["LADDER", "Scored", "floor_stats", "plan_for_budget"]

#: Budgets whose plans the guard always compares (those benchmarks/pareto.py measures).
LADDER = (1.0, 0.75, 0.5, 0.25)

#: Local-search work for the list the guard falls back on when the ILP solves
#: the budget (the report's trade-off uses the same bound); the greedy's own
#: list keeps ``remat_search.GREEDY_WORK``.
FALLBACK_WORK = 200_000


@dataclass
class Scored:
    """A plan with its saved bytes, recompute cost and predicted peak."""

    plan: remat.Plan
    bytes: float
    cost: float
    peak: int

    def key(self) -> tuple:
        return (self.cost, self.bytes, self.peak)


class _Scorer:
    """Scores plans of one graph, each once (by its saved and recomputed sets)."""

    def __init__(self, graph, info: remat.JointInfo):
        self.graph, self.info, self.cache = graph, info, {}

    def __call__(self, plan: remat.Plan) -> Scored:
        key = (frozenset(plan.saved), frozenset(plan.recomputed))
        if key not in self.cache:
            self.cache[key] = Scored(
                plan, remat.plan_bytes(self.info, plan.saved),
                round(sum(remat.recompute_cost(n) for n in plan.recomputed), 6),
                ledger.predicted_peak(self.graph, self.info, plan.saved, plan.recomputed))
        return self.cache[key]


def _frontier_plans(info, recomputable, unsavable, max_work) -> list[remat.Plan]:
    """``remat_search.tradeoff``'s frontier as plans, by saved bytes."""
    plans, frontier = remat_search.tradeoff(info, recomputable, unsavable, max_work=max_work)
    result = []
    for _, _, chosen in frontier.points:
        plans.load(chosen)
        live = [i for i, users in enumerate(plans.users) if users]
        saved = {plans.nodes[i] for i in live if not plans.in_r[i]}
        recomputed = {plans.nodes[i] for i in live if plans.in_r[i]}
        result.append(remat.Plan(saved, remat.needed_closure(info, saved, recomputed),
                                 "greedy (min-cut hull, Pareto local search)", False))
    return result


@dataclass
class _Walk:
    """What ``plan_for_budget`` hands the guard's walk."""

    save_all: float
    score: _Scorer
    default: Scored
    pool: object              # () -> list[Scored], the budget-independent list, made once
    solve: object             # fraction -> Plan | None (None: the list's greedy)


def _fits(candidate: Scored, level: float, walk: _Walk) -> bool:
    return candidate.bytes <= level * walk.save_all * (1 + 1e-12)


def _cap(level: float, previous: Scored | None, walk: _Walk) -> float:
    """The highest predicted peak admissible at ``level``."""
    cap = math.inf if previous is None else previous.peak
    if level < walk.default.bytes / walk.save_all:
        cap = min(cap, walk.default.peak)
    return cap


def _admissible(candidate: Scored, level: float, previous: Scored | None, walk: _Walk) -> bool:
    if not _fits(candidate, level, walk) or candidate.peak > _cap(level, previous, walk):
        return False
    return previous is None or (candidate.bytes <= previous.bytes
                                and candidate.cost >= previous.cost)


def _level(level: float, previous: Scored | None, walk: _Walk, record: dict) -> Scored | None:
    """The plan of one level of the walk (module docstring, "Rule")."""
    solved = walk.solve(level) if walk.solve is not None else None
    if solved is not None:   # its own label, though the list may hold the same plan
        solved = dataclasses.replace(walk.score(solved), plan=solved)
        if _admissible(solved, level, previous, walk):
            return solved
        if _fits(solved, level, walk):
            cap = _cap(level, previous, walk)
            record["rejected"].append({
                "memory_budget": level, "solver_peak_bytes": solved.peak,
                "cap_bytes": None if math.isinf(cap) else cap,
                "why": "predicted peak" if solved.peak > cap else "saved bytes or recompute"})
    pool = walk.pool() + ([previous] if previous is not None else [])
    admissible = [c for c in pool if _admissible(c, level, previous, walk)]
    if admissible:
        return min(admissible, key=Scored.key)
    fitting = [c for c in walk.pool() if _fits(c, level, walk)]
    fitting = [solved] if solved is not None and _fits(solved, level, walk) else fitting
    if not fitting:
        return None
    record["monotone"] = False
    return min(fitting, key=Scored.key)


def _walk(fraction: float, walk: _Walk, record: dict) -> Scored | None:
    levels = {level for level in LADDER if level > fraction}
    if walk.solve is None:      # the list's greedy: every breakpoint is a level
        levels |= {c.bytes / walk.save_all for c in walk.pool() if c.bytes / walk.save_all
                   > fraction}
    chosen = None
    for level in sorted(levels, reverse=True) + [fraction]:
        chosen = _level(level, chosen, walk, record) or chosen
        record["levels"] += 1
    return chosen


def plan_for_budget(graph, info: remat.JointInfo, fraction: float, save_all_bytes: float,
                    policy, exact: bool, log=None):
    """(plan, stats) for ``memory_budget=fraction`` (module docstring).
    ``policy``: ``cheap``/``any``/``forced_recompute`` predicates (the
    checkpoint pass's Policy); ``exact``: whether the ILP may solve it."""
    budget = fraction * save_all_bytes
    score = _Scorer(graph, info)
    floor_plan = remat.min_cut_plan(info, policy.any, policy.forced_recompute)
    floor = score(floor_plan)
    default = score(remat.min_cut_plan(info, policy.cheap, policy.forced_recompute))
    made: list = []

    def pool() -> list[Scored]:
        if not made:
            work = FALLBACK_WORK if exact else remat_search.GREEDY_WORK
            plans = _frontier_plans(info, policy.any, policy.forced_recompute, work)
            plans += [floor_plan, default.plan]
            made.append([score(p) for p in plans])
        return made[0]

    solve = None
    if exact:
        def solve(level):
            return remat.ilp_plan(info, level * save_all_bytes, policy.any,
                                  policy.forced_recompute)
    record = {"rejected": [], "monotone": True, "levels": 0, "ladder": list(LADDER)}
    walk = _Walk(save_all_bytes, score, default, pool, solve)
    chosen = _walk(fraction, walk, record) if floor.bytes <= budget else None
    if chosen is None:
        chosen = floor
        _warn_floor(fraction, budget, floor.bytes, save_all_bytes, log)
    stats = {"peak_guard": record, "budget_floor": floor_stats(floor.bytes, save_all_bytes),
             "predicted_peak_bytes": chosen.peak}
    return chosen.plan, stats


def floor_stats(floor_bytes: float, save_all_bytes: float) -> dict:
    """The floor in bytes and as a fraction of the save-all plan (rounded up,
    so asking for that fraction holds)."""
    fraction = math.ceil(floor_bytes / save_all_bytes * 1e4) / 1e4 if save_all_bytes else None
    return {"bytes": int(floor_bytes), "fraction": fraction}


def _warn_floor(fraction, budget, floor_bytes, save_all_bytes, log) -> None:
    floor = floor_stats(floor_bytes, save_all_bytes)
    message = (f"retrograd: memory_budget={fraction} asks for at most {budget:.0f} saved "
               f"bytes, but the smallest plan saves {floor_bytes:.0f} bytes (the budget "
               f"floor: {floor['fraction']} of the save-all plan's {save_all_bytes:.0f} "
               f"bytes, what the backward needs and cannot recompute); using that plan")
    warnings.warn(message, stacklevel=4)
    if log is not None:
        log.warning(message)
