"""Checkpoint placement inside the symbolic training step, planned at the size hints.

The static step places checkpoints in its one graph with the checkpoint
pass's ``rematerialize`` (passes/checkpoint.py): every backward reader of a
value the plan recomputes reads a copy evaluated just before its first
backward reader, so the forward's value dies at its last forward use. The
plan costs values by their bytes, which on the symbolic step graph are
expressions of the batch symbols; as the torch.compile and standalone faces
do (symbolic_partition.py), the plan is made on a *hinted copy* (same nodes
and names, values of the sizes the trace was made at) and what it chose is
then applied to the symbolic graph: the same nodes recomputed, a copy per
recomputed value inserted before the same first backward reader, by the
same rule (``replay``). Copies read the symbolic graph's own size
computations, so they hold at every size. The seed (the loss's cotangent)
stays a placeholder, given 1 at each call, instead of being folded.

Why a hint decides for every size: symbolic_partition.py's docstring (every
byte count is a product of the same symbols).

Not applied, with the reason logged and put in the report
(``symbolic.checkpoint.skipped``): a plan that recomputes a value reading
an input the step writes in place (its copy could run after the write;
BatchNorm's running statistics are written from values the backward does
not read, so they do not stop it), and a plan that fails at the hints (a warning; the graph
runs as traced, which is always right). An error in the user's options
(a ``save=`` pattern that matches nothing) is raised.
"""

from __future__ import annotations

import logging

import torch
from retrograd.dump import Dumper
from retrograd.passes import checkpoint
from retrograd.passes.planning import remat
from retrograd.pipeline import OpSupport, PassContext
from retrograd.symbolic_partition import hinted_copy
from retrograd.symbolic_plan import _ancestry
from torch import fx

__all__ = ["place_checkpoints", "replay"]

log = logging.getLogger("retrograd")


def place_checkpoints(gm: fx.GraphModule, seed: str, options, what: str) -> dict:
    """Apply the checkpoint plan made at the hints to the symbolic step graph
    ``gm`` (in place); returns the pass's stats (at the hints), or
    ``{"skipped": why}``. ``seed`` names the loss cotangent's placeholder."""
    if checkpoint.mutated_inputs(gm):
        return _skipped(what, "the step writes an input in place: the checkpoint pass's "
                              "copies of mutated inputs are not replayed on the symbolic graph")
    try:
        hinted = hinted_copy(gm)
        ctx = PassContext(options, Dumper(None, []), OpSupport(), "symbolic-step", seed=seed)
        _, stats = checkpoint.rematerialize(hinted, ctx)
    except Exception as error:   # the traced graph as it is is always right
        if getattr(error, "user_error", False):
            raise
        why = f"the plan failed: {type(error).__name__}: " + (
            str(error).splitlines()[0] if str(error) else "")
        log.warning("retrograd: %s: symbolic step: no checkpoint placement (%s); the backward "
                    "reads what the traced graph keeps", what, why)
        return {"skipped": why}
    if _recomputes_from_written_input(gm, set(stats["recomputed"])):
        return _skipped(what, "a value the plan recomputes reads an input the step writes "
                              "in place (its copy could read the new value)")
    copies = replay(gm, seed, set(stats["recomputed"]))
    stats = dict(stats, sizes="the trace's size hints", copies=copies)
    return stats


def _skipped(what: str, why: str) -> dict:
    log.info("retrograd: %s: symbolic step: no checkpoint placement: %s", what, why)
    return {"skipped": why}


def _recomputes_from_written_input(gm: fx.GraphModule, recomputed: set[str]) -> bool:
    """A recomputed value reads an input the step writes (``copy_``,
    functionalization's write-back of a buffer such as BatchNorm's running
    statistics), or a view of one: its copy could run after the write and
    read the new value. (The traced step writes BatchNorm's statistics only
    from forward values that are not read by the backward: no copy reads them.)"""
    written = {node.args[0] for node in gm.graph.nodes if node.op == "call_function"
               and node.target is torch.ops.aten.copy_.default
               and isinstance(node.args[0], fx.Node) and node.args[0].op == "placeholder"}
    if not written:
        return False
    for node in gm.graph.nodes:
        if node.name in recomputed and any(
                arg in written or _ancestry(arg) & written for arg in node.all_input_nodes):
            return True
    return False


def replay(gm: fx.GraphModule, seed: str, recomputed: set[str]) -> int:
    """Make every backward reader of a value named in ``recomputed`` read a
    copy of it (and of the recomputed values it reads) inserted before that
    reader's first backward reader, as ``rematerialize`` does; returns how
    many copies were inserted."""
    graph = gm.graph
    backward = remat.backward_nodes(
        graph, lambda node: node.op == "placeholder" and node.name == seed)
    copies = checkpoint.recompute_in_backward(
        graph, backward, lambda node: node.name in recomputed and node not in backward)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return len(copies)
