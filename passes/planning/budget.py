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
   it cannot hold: a plan saving the floor's bytes is used (the walk's plan
   at the floor's fraction, step 3) and a warning names the floor in
   bytes and as a fraction of the save-all plan. The stats record it
   (``budget_floor``) under every budget, so a user sees the smallest budget
   worth asking for.
3. **The peak guard**: the measured step peak should not rise as the budget
   tightens, which Inductor's budget does not promise (pytorch issue 197838:
   a tighter ``activation_memory_budget`` measured a higher peak, because
   the recomputed values live in the backward too). retrograd cannot measure
   while compiling, so it holds the rule on its *predicted* peak
   (``ledger.predicted_peak``).

   **The walk.** One sequence of levels, the same for every budget: the
   fractions ``k / GRID`` (1.0, 0.95, ..., 0.05), the floor's fraction and,
   when the solver is the list's greedy, every fraction at which a listed
   plan starts to fit; from the loosest down. Each level ``l`` has a plan
   ``W(l)``, fixed by ``l`` and the previous level's plan alone: that plan
   again if it is *admissible* at ``l`` (no solve), else the solver's plan
   at ``l`` if admissible, else the cheapest admissible plan among the
   previous level's plan, the budget-independent list (the trade-off's
   frontier, the default min-cut plan, the floor) and the *descent* of the
   previous level's plan (``budget_descent.py``: its saved values recomputed
   one at a time until it fits). *Admissible* at ``l``: saved bytes <= l x
   save_all; a predicted peak no higher than the previous level's plan's; no
   more saved bytes and no less recompute than the previous level's plan.
   Among admissible plans those that hold, *near the peak*, no more bytes
   than the previous plan at any graph position where they hold more than
   ``(1 - 2 x MARGIN)`` of its peak come first (the solver's plan is taken
   at once only if it does).

   **Near the peak.** The predicted peak is a count in the joint graph's
   order; the program runs a scheduled order, and on BERT the prediction
   sits ~4% under the measurement at a weight gradient's matmul
   (``mm_default_27``: the schedule runs it before the in-place sum of the
   three projections' input gradients, 4 kB the graph order frees first)
   while it puts the peak at an attention backward. Plans were ranked at
   the wrong place: 0.5's plan predicted 188 bytes above 0.75's (its saved
   norm statistics alive at the attention backward) and the default plan
   192 below it, yet both measured higher (100,040 and 100,112 against
   99,848), at that matmul. A tighter plan that adds bytes only far below
   the peak cannot move it under any per-position error of at most MARGIN
   of the peak (the same for both plans: the backward is the same); one
   that adds bytes near it can. The rule used to cap plans below the
   default plan's fraction at the default's predicted peak too; on BERT that
   cap forced plans that measured higher, so it is gone.

   A solver plan that fits but fails is *rejected* (the stats'
   ``peak_guard.rejected`` lists each, with its peak and the cap). If no
   plan is admissible, the cheapest fitting plan that saves no more and
   recomputes no less than the previous level's is taken (else the
   solver's, where it has one, else the list's cheapest fitting) and
   ``peak_guard.monotone`` is false.

   **The rule.** ``memory_budget=f`` runs the plan ``W(l*)`` of the first
   level ``l*`` of the walk whose plan saves at most ``f x save_all`` bytes
   (``peak_guard.level``). A budget on the grid (0.05, 0.1, ..., 1.0) gets
   its own level's plan; one between grid points gets a plan of the grid
   point above if that plan already fits it, else of a level below: the
   budget is quantised, never exceeded, at the price of up to 1/GRID of
   ``save_all`` left unused. A budget below the floor gets what the floor's
   fraction gets (with the warning of step 2).

   **What it guarantees** (proof). Take budgets ``f1 > f2`` and suppose
   ``peak_guard.monotone`` is true for ``f2``. (a) The walk does not depend
   on the budget, so ``W(l)`` is the same plan in both compiles for every
   level ``l``; only where the walk stops differs. (b) ``l*(f1) >= l*(f2)``:
   the plan ``W(l*(f2))`` saves at most ``f2 x save_all < f1 x save_all``
   bytes, so it fits ``f1`` too, and the walk for ``f1`` stops at it or at an
   earlier (looser) level. (c) Along the walk down to ``l*(f2)`` every level
   took an admissible plan (``monotone``), so the predicted peak never rises
   from one level to the next, hence ``peak(W(l*(f2))) <= peak(W(l))`` for
   every level ``l >= l*(f2)``, ``l*(f1)`` among them. So the plan for
   ``f2`` never predicts a higher peak than the plan for ``f1``, for any two
   budgets, on or off the grid, below the floor too (they run as the
   floor's fraction), exact solver or greedy; the same argument gives saved
   bytes non-increasing and recompute cost non-decreasing.
   ``tests/test_budget_pairs.py`` checks it over random budget pairs.

   The cost: one solve per level where the previous plan no longer fits,
   at most one per grid fraction above ``f`` (the ILP's plan at a level is
   also optimal at the tighter levels it still fits, so they need none).
   The solves and the trade-off list are kept per planning problem
   (``budget_memo.py``): a later compile of the same graph under another
   budget walks the same levels without solving them again. Measured on the
   zoo's gpt2_tiny in docs/design.md ("Peak guard").
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

from retrograd.passes.planning import budget_descent, budget_memo, ledger, remat, remat_search

__all__ = ["GRID", "LADDER", "Scored", "floor_stats", "levels", "plan_for_budget"]

#: The walk's grid: the fractions k / GRID, k = GRID .. 1 (module docstring).
GRID = 20

#: The predicted peak's error per position the guard allows for (a fraction of
#: the peak): see "Near the peak" in the module docstring.
MARGIN = 0.05

#: Budgets benchmarks/pareto.py measures (all on the grid).
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
    curve: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def key(self) -> tuple:
        return (self.cost, self.bytes, self.peak)


class _Scorer:
    """Scores plans of one graph, each once (by its saved and recomputed sets)."""

    def __init__(self, graph, info: remat.JointInfo, scratch=None):
        self.graph, self.info, self.cache, self.scratch = graph, info, {}, scratch

    def __call__(self, plan: remat.Plan) -> Scored:
        key = (frozenset(plan.saved), frozenset(plan.recomputed))
        if key not in self.cache:
            curve = ledger.profile(self.graph, self.info, plan.saved, plan.recomputed,
                                   self.scratch)
            self.cache[key] = Scored(
                plan, remat.plan_bytes(self.info, plan.saved),
                round(sum(remat.recompute_cost(n) for n in plan.recomputed), 6),
                max(curve.values(), default=0), curve)
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
    descend: object = None    # (previous, level) -> Scored | None (budget_descent.py)


def _fits(candidate: Scored, level: float, walk: _Walk) -> bool:
    return candidate.bytes <= level * walk.save_all * (1 + 1e-12)


def _cap(level: float, previous: Scored | None, walk: _Walk) -> float:
    """The highest predicted peak admissible at ``level``."""
    return math.inf if previous is None else previous.peak


def _near_peak_ok(candidate: Scored, previous: Scored | None) -> bool:
    """No position where ``candidate`` is within ``2 x MARGIN`` of the previous
    plan's peak holds more than the previous plan does there."""
    return previous is None or budget_descent.excess(candidate, previous, MARGIN) <= 0


def _admissible(candidate: Scored, level: float, previous: Scored | None, walk: _Walk) -> bool:
    if not _fits(candidate, level, walk) or candidate.peak > _cap(level, previous, walk):
        return False
    return previous is None or (candidate.bytes <= previous.bytes
                                and candidate.cost >= previous.cost)


def _level(level: float, previous: Scored | None, walk: _Walk, record: dict) -> Scored | None:
    """``W(level)`` from the previous level's plan (module docstring, "The walk")."""
    if previous is not None and _admissible(previous, level, previous, walk):
        return previous          # still fits: the solver's plan there would cost no less
    solved = walk.solve(level) if walk.solve is not None else None
    if solved is not None:   # its own label, though the list may hold the same plan
        solved = dataclasses.replace(walk.score(solved), plan=solved)
        if _admissible(solved, level, previous, walk) and _near_peak_ok(solved, previous):
            return solved
        if _fits(solved, level, walk):
            cap = _cap(level, previous, walk)
            record["rejected"].append({
                "memory_budget": level, "solver_peak_bytes": solved.peak,
                "cap_bytes": None if math.isinf(cap) else cap,
                "why": "predicted peak" if solved.peak > cap else "near the peak"
                if _admissible(solved, level, previous, walk) else "saved bytes or recompute"})
    pool = walk.pool() + ([previous] if previous is not None else [])
    if previous is not None and walk.descend is not None:
        pool += [d for d in [walk.descend(previous, level)] if d is not None]
    if solved is not None:
        pool.append(solved)
    admissible = [c for c in pool if _admissible(c, level, previous, walk)]
    if admissible:   # near the peak no higher first (module docstring), then cheapest
        return min(admissible, key=lambda c: (not _near_peak_ok(c, previous), c.key()))
    fitting = [c for c in walk.pool() if _fits(c, level, walk)]
    fitting = [solved] if solved is not None and _fits(solved, level, walk) else fitting
    ordered = [c for c in pool if _fits(c, level, walk) and previous is not None
               and c.bytes <= previous.bytes and c.cost >= previous.cost]
    fitting = ordered or fitting   # saved bytes and recompute stay ordered where they can
    if not fitting:
        return None
    record["monotone"] = False
    return min(fitting, key=Scored.key)


def levels(walk: _Walk, floor: Scored) -> list[float]:
    """The walk's levels, loosest first: the grid, the floor's fraction and,
    under the list's greedy, where each listed plan starts to fit. None
    depends on the budget asked for (the proof's step (a))."""
    points = {k / GRID for k in range(GRID, 0, -1)} | {floor.bytes / walk.save_all}
    if walk.solve is None:
        points |= {c.bytes / walk.save_all for c in walk.pool()}
    return sorted((p for p in points if 0 < p <= 1), reverse=True)


def _walk(fraction: float, walk: _Walk, floor: Scored, record: dict) -> Scored | None:
    """``W(l*)``: the plan of the first level whose plan fits ``fraction``."""
    chosen = None
    for level in levels(walk, floor):
        chosen = _level(level, chosen, walk, record) or chosen
        record["levels"] += 1
        if chosen is not None and _fits(chosen, fraction, walk):
            record["level"] = level
            return chosen
    return None


def plan_for_budget(graph, info: remat.JointInfo, fraction: float, save_all_bytes: float,
                    policy, exact: bool, log=None, scratch=None):
    """(plan, stats) for ``memory_budget=fraction`` (module docstring).
    ``policy``: ``cheap``/``any``/``forced_recompute`` predicates (the
    checkpoint pass's Policy); ``exact``: whether the ILP may solve it;
    ``scratch``: an extern op's scratch bytes for the peak (``ledger.profile``)."""
    budget = fraction * save_all_bytes
    score = _Scorer(graph, info, scratch)
    floor_plan = remat.min_cut_plan(info, policy.any, policy.forced_recompute)
    floor = score(floor_plan)
    default = score(remat.min_cut_plan(info, policy.cheap, policy.forced_recompute))
    if not save_all_bytes:   # the backward reads no activation: nothing to trade
        return default.plan, {"peak_guard": None, "budget_floor": floor_stats(0, 0),
                              "predicted_peak_bytes": default.peak}
    made: list = []
    work = FALLBACK_WORK if exact else remat_search.GREEDY_WORK
    memo = budget_memo.Memo(budget_memo.problem_key(
        graph, info, policy, save_all_bytes, (exact, GRID, work)), graph)

    def pool() -> list[Scored]:
        if not made:
            plans = memo.frontier(lambda: _frontier_plans(info, policy.any,
                                                          policy.forced_recompute, work))
            made.append([score(p) for p in plans + [floor_plan, default.plan]])
        return made[0]

    solve = None
    if exact:
        def solve(level):
            return memo.solve(level, lambda level: remat.ilp_plan(
                info, level * save_all_bytes, policy.any, policy.forced_recompute))
    record = {"rejected": [], "monotone": True, "levels": 0, "grid": GRID, "level": None}
    can, _ = info.predicates(policy.any, policy.forced_recompute)

    def descend(previous, level):
        return budget_descent.descend(info, previous, lambda c: _fits(c, level, walk), score,
                                      can, MARGIN)
    walk = _Walk(save_all_bytes, score, default, pool, solve, descend)
    below_floor = not _fits(floor, fraction, walk)
    if below_floor:   # the walk's plan at the floor: what any budget down there gets
        _warn_floor(fraction, budget, floor.bytes, save_all_bytes, log)
    chosen = _walk(floor.bytes / save_all_bytes if below_floor else fraction, walk, floor,
                   record) or floor
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
