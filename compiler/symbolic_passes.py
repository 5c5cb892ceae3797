"""Graph passes on symbolic programs, and what their reports say is not done.

The graph-level passes a static joint graph runs first (``dead_gradient``:
only the gradients the caller asked for; ``cleanup``: dead code, common
subexpressions, no-op views, unread results of masked ops) read no byte
counts, but a few of their rewrites compare sizes (a no-op view: the same
shape; a sum with a zero term: the other term has the result's shape). On a
symbolic graph such a comparison (``s0 == s1``) would be decided at the
trace's sizes and become a guard that fixes them, or, worse, be decided
without one. So ``run_size_agnostic`` runs each pass on a copy of the
symbolic graph while every size question the pass asks is answered only
where the shape environment decides it for *every* size (its value ranges
and replacements: ``s0 == s0``, ``4*s0 == s0`` with ``s0 >= 2``) and raises
``SizeDependent`` otherwise; the pass's result is kept only if no question
needed a guard and no node it made holds a size as a number (a fill of
``[s0, 4]`` written with the symbol itself instead of a ``sym_size`` node).
Otherwise the graph stays as it was and the report records the pass as
skipped, with the question that stopped it. A pass that runs adds no guard.

Not run on symbolic programs, each stated in the report: CUDA graphs (a
graph fixes every size; ``cudagraphs_record``) and offload (``OFFLOAD``: its
plan and host buffers are sized at compile time).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Sequence
from time import perf_counter
from typing import Any

import torch
from retrograd.dump import Dumper
from retrograd.passes import cleanup, dead_gradient
from retrograd.pipeline import OpSupport, PassContext
from torch import fx

__all__ = ["OFFLOAD", "SizeDependent", "cudagraphs_record", "offload_record", "run_passes",
           "run_size_agnostic", "shape_env_of"]

log = logging.getLogger("retrograd")

#: The graph passes a symbolic graph runs, per stage, in pipeline order: a
#: joint graph before its split, compile_step's graph before checkpoints, a
#: forward alone (no gradient needed).
PASSES = {"joint": (("dead_gradient", dead_gradient), ("cleanup", cleanup)),
          "step": (("cleanup", cleanup),), "inference": (("cleanup", cleanup),)}

#: Why offload never runs on a symbolic program (report and error text).
OFFLOAD = ("offload needs static shapes: its plan (which activations go to host memory, "
           "when each copy is issued) and its host buffers are sized at compile time")


class SizeDependent(Exception):
    """A pass asked a size question only a guard could answer."""


def shape_env_of(gm: fx.GraphModule):
    """The ShapeEnv of ``gm``'s symbolic sizes, or None (a static graph)."""
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        values = value if isinstance(value, (tuple, list)) else [value]
        for item in values:
            sizes = [item] if isinstance(item, torch.SymInt) else \
                list(item.shape) if isinstance(item, torch.Tensor) else []
            for size in sizes:
                if isinstance(size, torch.SymInt):
                    return size.node.shape_env
    return None


@contextlib.contextmanager
def guard_free(env):
    """Within it, a size question of ``env`` is answered only where the
    answer holds at every size (``_maybe_evaluate_static``); any other
    raises ``SizeDependent`` instead of adding a guard."""
    if env is None:
        yield
        return

    def evaluate_expr(orig_expr, hint=None, fx_node=None, size_oblivious=False,
                      fallback_value=None, *, forcing_spec=False):
        static = env._maybe_evaluate_static(orig_expr)
        if static is None or static.free_symbols:
            raise SizeDependent(f"{orig_expr} is decided only by a guard on the sizes")
        return static
    env.evaluate_expr = evaluate_expr   # shadows the method on this instance only
    try:
        yield
    finally:
        del env.evaluate_expr


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` (nodes and metadata by value) a pass may rewrite."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    copied = fx.GraphModule(gm, graph)
    copied.recompile()
    return copied


def _raw_size(gm: fx.GraphModule) -> str | None:
    """A node holding a size as a SymInt object (codegen cannot print it)."""
    for node in gm.graph.nodes:
        leaves = torch.utils._pytree.tree_leaves((node.args, node.kwargs))
        found = [leaf for leaf in leaves if isinstance(leaf, torch.SymInt)]
        if found:
            return f"{node.name} holds the size {found[0]} as a number"
    return None


def _plain(value: Any) -> Any:
    """Stats for the report: a symbolic count as its expression."""
    if isinstance(value, torch.SymInt):
        return str(value.node.expr)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def run_size_agnostic(name: str, module, gm: fx.GraphModule, ctx) -> tuple[fx.GraphModule, dict]:
    """(graph, the report's pass record): ``module.run`` on a copy of ``gm``
    kept where it needed no guard (module docstring), else ``gm`` unchanged
    and a record saying why."""
    before, started = len(gm.graph.nodes), perf_counter()
    env = shape_env_of(gm)
    guards = len(env.guards) if env is not None else 0
    try:
        with guard_free(env):
            result = module.run(_copy(gm), ctx)
        subject, stats = result
        raw = _raw_size(subject)
        if raw is not None:
            raise SizeDependent(raw)
        subject.graph.lint()
    except SizeDependent as error:
        log.info("retrograd: %s: pass %s not run on the symbolic graph: %s", ctx.graph_name,
                 name, error)
        subject, stats = gm, {"skipped": f"a size comparison only a guard decides: {error}"}
    if env is not None and len(env.guards) != guards:   # never: guard_free forbids them
        raise AssertionError(f"retrograd: pass {name} added a guard to a symbolic program")
    return subject, {"name": name, "seconds": round(perf_counter() - started, 6),
                     "nodes_before": before, "nodes_after": len(subject.graph.nodes),
                     "stats": _plain(dict(stats))}


def run_passes(gm: fx.GraphModule, stage: str, options, what: str, num_fwd_outputs=None,
               gradients=None) -> tuple[fx.GraphModule, list[dict]]:
    """``gm`` after the passes ``stage`` runs (``PASSES``: "joint" for a joint
    graph before its split, "step" for compile_step's graph, "inference" for
    a forward alone), less those in
    ``options.disable``, and their records for the reports."""
    ctx = PassContext(options, Dumper(None, []), OpSupport(), what, gradients=gradients,
                      num_fwd_outputs=num_fwd_outputs)
    disabled = getattr(options, "disable", ()) or ()
    records = []
    for name, module in PASSES[stage]:
        if name not in disabled:
            gm, record = run_size_agnostic(name, module, gm, ctx)
            records.append(record)
    return gm, records


def cudagraphs_record(requested: bool | None, dims: str, what: str, executor: str,
                      nodes: int) -> dict:
    """The report's codegen record for a symbolic program: its ``cudagraphs``
    decision has the static programs' shape (runtime/cudagraphs.py ``decide``)
    and is never enabled; ``cudagraphs=True`` warns, as for a static program
    that cannot be captured."""
    if requested is False:
        reasons = ["option cudagraphs=False"]
    else:
        reasons = [(f"symbolic sizes ({dims}): a CUDA graph fixes every size, and this "
                    f"program serves each size its shape guards admit")]
    if requested is True:
        warnings.warn(f"retrograd: cudagraphs=True, but the symbolic program of {what} runs "
                      f"without a CUDA graph: {reasons[0]}", stacklevel=3)
    return {"name": "codegen", "seconds": 0.0, "nodes_before": nodes, "nodes_after": nodes,
            "stats": {"executor": executor,
                      "cudagraphs": {"enabled": False, "reasons": reasons}}}


def offload_record(options, what: str) -> dict:
    """The report's record for offload on a symbolic program: not run, with
    the reason (``OFFLOAD``); where the user asked for it (``offload=``
    patterns), also a warning. Not an error: the program is right, only its
    saved values stay on the device."""
    asked: Sequence = getattr(options, "offload", ()) or ()
    if asked:
        warnings.warn(f"retrograd: offload={list(asked)!r} is not applied to the symbolic "
                      f"program of {what}: {OFFLOAD}; pass dynamic=False to compile a static "
                      f"program per size", stacklevel=3)
    return {"name": "offload", "seconds": 0.0, "nodes_before": None, "nodes_after": None,
            "stats": {"skipped": OFFLOAD, "asked": list(asked)}}
