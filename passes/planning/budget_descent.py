"""The peak guard's descent: the previous level's plan, made to fit a tighter level.

``budget.plan_for_budget`` walks one level sequence from the loosest budget
down. Where a level's own solver plan predicts a higher peak than the plan
above it (the guard rejects it) and no listed plan does better, the walk
used to take the cheapest fitting plan and give up monotonicity there. The
plans it compared were each optimal for some budget on their own, so none
kept what made the previous level's peak low.

Measured on transformers' BERT (``benchmarks/pareto.py``): 0.75's plan
recomputed the attention mask (``where``, 512 bytes) and the embedding
norm's statistics (``rsqrt``, its mean, and ``gather``, 64 bytes each) after
layer 0's attention backward, where the step peaks; the exact solver's plan
at 0.5 recomputes larger values (matrix products, the embeddings) and saves
those four, cheaper to keep than to make again, which are then alive at the
peak: 188 bytes more predicted, 192 measured (99,848 -> 100,040). No single
move away from 0.5's plan lowers its peak (all four must go), but 0.75's
plan, with a few of its large saved values recomputed, fits 0.5 and keeps
the dip.

So the descent: from the previous level's plan, repeatedly recompute one
saved value (with the inputs it needs that are neither saved nor inputs,
recursively: a *deep* recompute, which never saves anything new, so bytes
only fall and recompute only grows), choosing the move whose plan predicts
the lowest peak, ties broken by the most bytes freed per unit of recompute
cost, until the plan fits the level. The result is a candidate beside the
solver's and the list's; the guard's rule (admissible, then cheapest)
decides. It depends only on the level and the previous plan, as the walk's
proof needs (``budget.py``, step (a)).
"""

from __future__ import annotations

from retrograd.passes.planning import remat

__all__ = ["descend", "recompute_deep"]

#: Moves the descent may take per level (each costs one predicted peak per
#: saved value): a bound on compile time, far above the few a grid step takes.
MAX_STEPS = 32


def recompute_deep(info: remat.JointInfo, plan: remat.Plan, value, can) -> remat.Plan | None:
    """``plan`` with ``value`` recomputed instead of saved, and every input it
    needs that is neither saved nor an input recomputed too (recursively);
    None if one of them may not be recomputed (``can``)."""
    saved = set(plan.saved) - {value}
    recomputed, work = set(plan.recomputed), [value]
    while work:
        node = work.pop()
        if node in recomputed or node in saved or node.op == "placeholder":
            continue
        if not can(node):
            return None
        recomputed.add(node)
        work.extend(info.inputs_of(node))
    solver = plan.solver.split(", then")[0] + ", then peak guard descent (deep recomputes)"
    return remat.Plan(saved, remat.needed_closure(info, saved, recomputed), solver, False)


def _moves(info, scored, score, can):
    """Every deep recompute of one saved value that frees bytes, scored,
    largest storage first."""
    values = sorted((v for v in scored.plan.saved if v.op != "placeholder"),
                    key=lambda node: (-remat.value_bytes(info.storage(node)), node.name))
    for value in values:
        plan = recompute_deep(info, scored.plan, value, can)
        if plan is not None:
            moved = score(plan)
            if moved.bytes < scored.bytes:
                yield moved


def excess(candidate, start, margin: float) -> int:
    """Bytes by which ``candidate`` holds more than ``start`` at some graph
    position near ``start``'s peak (within ``2 x margin`` of it): 0 when it
    never does (``budget.py``, "Near the peak")."""
    band = start.peak * (1 - 2 * margin)
    return max((live - max(start.curve.get(at, 0), band)
                for at, live in candidate.curve.items()), default=0) if start.curve else 0


def descend(info: remat.JointInfo, start, fits, score, can, margin: float):
    """``start`` (a scored plan) with saved values recomputed one deep move
    at a time, each the move that adds the fewest bytes near ``start``'s peak
    (``excess``), then predicts the lowest peak, then frees the most bytes per
    recompute cost, until ``fits``; None if it cannot."""
    current = start
    for _ in range(MAX_STEPS):
        if fits(current):
            return current
        moves = list(_moves(info, current, score, can))
        if not moves:
            return None
        current = min(moves, key=lambda m: (max(excess(m, start, margin), 0), m.peak,
                                            -(current.bytes - m.bytes)
                                            / max(m.cost - current.cost, 1e-9)))
    return current if fits(current) else None
