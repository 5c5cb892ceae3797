"""Checkpoint placement: which forward values the backward gets, and the split.

For now the simplest honest plan: save exactly what the backward uses, as
eager autograd does, and recompute nothing. The split itself follows
AOTAutograd's ``default_partition`` (forward = everything the forward
outputs need; saved = forward values the backward reads; backward = the
rest), which this pass calls. Its stats report the bytes saved between the
two halves, counted once per distinct value and leaving out the inputs and
parameters and views of them (``permute(weight)``), which share storage the
caller keeps alive anyway (the same convention as measuring eager with
``torch.autograd.graph.saved_tensors_hooks``).

Assumes the AOTAutograd joint graph (``forward(primals, tangents)``).
Returns two GraphModules, forward and backward.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._functorch.partitioners import default_partition

from retrograd.passes.fusion import is_view

__all__ = ["run", "saved_values"]


def _aliases_input(node: fx.Node | None) -> bool:
    """True for a forward placeholder or a view of one (``permute(primals_1)``):
    it shares the caller's storage, so saving it costs no memory."""
    while node is not None and is_view(node) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node is not None and node.op == "placeholder"


def saved_values(forward: fx.GraphModule, backward: fx.GraphModule):
    """The backward's placeholders that the forward hands over (not tangents),
    and those of them that are activations (neither inputs nor their views)."""
    forward_nodes = {node.name: node for node in forward.graph.nodes}
    saved = [node for node in backward.graph.nodes
             if node.op == "placeholder" and not node.name.startswith("tangents")]
    activations = [node for node in saved if not _aliases_input(forward_nodes.get(node.name))]
    return saved, activations


def _bytes(nodes) -> int:
    total = 0
    for node in nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            total += val.numel() * val.element_size()
    return total


def run(joint: fx.GraphModule, ctx, joint_inputs, **partition_kwargs):
    """Split ``joint`` into (forward, backward); stats give the saved bytes."""
    forward, backward = default_partition(joint, joint_inputs, **partition_kwargs)
    saved, activations = saved_values(forward, backward)
    stats = {
        "plan": "save what the backward uses (no recompute)",
        "saved_values": len(saved),
        "saved_activation_values": len(activations),
        "saved_activation_bytes": _bytes(activations),
        "saved_input_bytes": _bytes(saved) - _bytes(activations),
        "recomputed_nodes": 0,
        "recomputed_flops": 0,
    }
    return (forward, backward), stats
