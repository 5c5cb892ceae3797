"""The names ``save=``, ``recompute=`` and ``offload=`` patterns match, and the check that
each pattern matches something.

A pattern names an aten op (``"mm"``, ``"aten.mm"``, ``"aten.mm.default"``) or
an fx node (``"addmm_3"``). A pattern that matches no node of the graph being
compiled would be ignored without a word, so a typo (``"adddmm"``) would
silently change nothing; ``check`` refuses it with the closest names of the
graph instead. The check covers the whole joint (or step) graph, so a
pattern naming an op that occurs only in the backward, or a forward node, is
accepted. A pattern that names a real op which this graph lacks is only
warned about: under ``torch.compile`` a graph break can put that op in
another graph compiled with the same options.

Example:
    >>> check(joint.graph, ("adddmm",), (), "model-backward")   # doctest: +SKIP
    PatternError: retrograd: save pattern 'adddmm' matches no op or node of ...
"""

from __future__ import annotations

import difflib
import warnings

import torch
from torch import fx

__all__ = ["PatternError", "check", "node_names"]


class PatternError(ValueError):
    """A ``save=``/``recompute=`` pattern that names nothing: a user error, so
    the pass manager passes it on as it is (``user_error``)."""

    user_error = True


def node_names(node: fx.Node) -> set[str]:
    """Every name a pattern may use for ``node``: its fx name, its target
    (``aten.mm.default``) and its op (``aten.mm``, ``mm``)."""
    target = node.target
    names = {node.name, str(target)}
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        names |= {str(packet), str(packet).split(".")[-1]}
    return names


def _is_op(pattern: str) -> bool:
    """``pattern`` names an existing op: ``mm`` (aten), ``aten.mm``, ``aten.mm.default``."""
    parts = pattern.split(".")
    namespace, rest = ("aten", parts) if len(parts) == 1 else (parts[0], parts[1:])
    if len(rest) > 2 or not all(rest):
        return False
    try:
        op = getattr(getattr(torch.ops, namespace), rest[0])
        if not isinstance(op, torch._ops.OpOverloadPacket):   # "__class__" and the like
            return False
        return len(rest) == 1 or rest[1] in op.overloads()
    except (AttributeError, RuntimeError):
        return False


def check(graph, save, recompute, graph_name: str, offload=()) -> None:
    """Raise ``PatternError`` for a pattern that matches no node of ``graph``
    (an fx graph, or several: a split forward and backward) and names no op;
    warn for one naming an op ``graph`` does not hold."""
    names: set[str] = set()
    for part in [graph] if isinstance(graph, fx.Graph) else graph:
        for node in part.nodes:
            names |= node_names(node) if node.op == "call_function" else {node.name}
    for option, patterns in (("save", save), ("recompute", recompute), ("offload", offload)):
        for pattern in patterns:
            if pattern in names:
                continue
            if _is_op(pattern):
                warnings.warn(f"retrograd: {option} pattern {pattern!r} matches no node of "
                              f"graph {graph_name}: the graph does not hold that op "
                              f"(decomposed, or in another graph)", stacklevel=2)
                continue
            close = difflib.get_close_matches(pattern, sorted(names), n=5, cutoff=0.5)
            hint = f"; close matches: {', '.join(map(repr, close))}" if close else ""
            raise PatternError(f"retrograd: {option} pattern {pattern!r} matches no op or "
                               f"node of graph {graph_name} and names no aten op{hint} "
                               f"(node names are per graph: see the dump's graphs)")
