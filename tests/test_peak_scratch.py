"""An extern op's scratch in the checkpoint pass's predicted peak.

oneDNN's convolutions on the CPU allocate weight copies and a scratchpad
beyond their result (15-25 kB on the zoo's CNN, whose values alive at once
are 8,800 bytes): the measured peak rose from ``memory_budget`` 0.75 to
0.5 while the prediction, blind to scratch, stayed flat. The ledger counts
a scratch the compiler hands it (``scratch(node)``) while the op runs, at
its forward slot and at its recomputation's.
"""

from __future__ import annotations

import retrograd
import torch
from retrograd import extern_scratch
from retrograd.passes.planning import ledger, remat

from tests.test_peak_views import VALUE, _module, _views
from tests.zoo import ZOO

SCRATCH = 1000


def _at(module, nodes, saved, recomputed, scratch, name) -> int:
    """Bytes alive at ``name``'s own slot."""
    info = remat.analyse(module, 1)
    lives = list(ledger._lives(module.graph, info, {nodes[n] for n in saved},
                               {nodes[n] for n in recomputed}, scratch))
    at = (list(module.graph.nodes).index(nodes[name]), ledger._AFTER)
    return sum(size for size, first, last in lives if first <= at <= last)


def test_the_ledger_counts_a_given_scratch_at_its_node():
    """``sin`` takes 1,000 bytes of scratch: at its slot relu, sin's result,
    its scratch (by hand: 2 values + 1,000, above the 2 values + 4 of the
    peak without it); ``mm`` with none is unchanged."""
    module, nodes = _module(_views)
    info = remat.analyse(module, 1)

    def scratch(node):
        return SCRATCH if node.name == "sin" else None
    saved = {nodes["relu"]}
    assert ledger.predicted_peak(module.graph, info, saved, set()) == 2 * VALUE + 4
    assert ledger.predicted_peak(module.graph, info, saved, set(), scratch) == \
        2 * VALUE + SCRATCH
    assert _at(module, nodes, ["relu"], [], scratch, "sin") == 2 * VALUE + SCRATCH
    assert _at(module, nodes, ["relu"], [], scratch, "mm") == \
        _at(module, nodes, ["relu"], [], None, "mm")


def test_a_recomputed_op_takes_its_scratch_again_where_it_is_recomputed():
    """relu recomputed before ``mm``: its scratch counts in the forward and
    again at its recomputation, just before ``mm``."""
    module, nodes = _module(_views)
    info = remat.analyse(module, 1)

    def scratch(node):
        return SCRATCH if node.name == "relu" else None
    lives = list(ledger._lives(module.graph, info, set(), {nodes["relu"], nodes["t"]},
                               scratch))
    instants = sorted(first for size, first, last in lives
                      if size == SCRATCH and first == last)
    order = list(module.graph.nodes).index
    assert [at[0] for at in instants] == [order(nodes["relu"]), order(nodes["mm"])]


def test_a_convolutions_probe_reaches_the_checkpoint_pass():
    """On the zoo's CNN the compiler probes each convolution (forward and
    backward) on its recorded metadata, and the checkpoint pass's predicted
    peak includes that scratch: above the 8,800 bytes of values alone."""
    entry = ZOO["cnn"]
    torch.manual_seed(0)
    model, inputs = entry.model(), entry.inputs()
    compiled = retrograd.compile(model, executor="fx", memory_budget=0.75)
    entry.run(compiled, inputs).backward()
    [stats] = [p["stats"] for p in compiled.reports["forward"]["passes"]
               if p["name"] == "checkpoint"]
    assert stats["predicted_peak_bytes"] > 8_800 + 10_000, stats["predicted_peak_bytes"]


def test_node_scratch_is_none_for_an_op_without_workspace():
    """Only ``SCRATCH_OPS`` are probed (each probe is a real call)."""
    module, nodes = _module(_views)
    assert extern_scratch.node_scratch(nodes["sin"]) is None
