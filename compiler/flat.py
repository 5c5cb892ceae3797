"""A call of the user's function or module as a module of flat tensors.

AOTAutograd traces a module whose inputs are tensors and whose outputs are
a tuple of tensors. The standalone face (trace_cache.py) wraps the user's
call in ``Flat``: it rebuilds the user's (pytree) arguments around the
tensors it is given and records how to rebuild the user's output structure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = ["Flat"]


class Flat(torch.nn.Module):
    """``target(*args, **kwargs)`` as a module of tensor inputs and tensor outputs.

    AOTAutograd wants flat tensor inputs and a tuple of tensors out; this
    module rebuilds the user's arguments around the tensors and records how
    to rebuild the user's output structure.
    """

    _retrograd_internal = True   # its attribute reads are not guarded (guards.py)

    def __init__(self, target: Callable, in_spec, leaves: list, tensor_slots: list[int]):
        super().__init__()
        self.target = target
        self.in_spec = in_spec
        self.leaves = leaves
        self.tensor_slots = tensor_slots
        self.out_spec = None
        self.out_constants: dict[int, Any] = {}
        self.out_tensor_slots: list[int] = []

    def forward(self, *tensors):
        leaves = list(self.leaves)
        for slot, tensor in zip(self.tensor_slots, tensors):
            leaves[slot] = tensor
        args, kwargs = pytree.tree_unflatten(leaves, self.in_spec)
        result = self.target(*args, **kwargs)
        out_leaves, self.out_spec = pytree.tree_flatten(result)
        self.out_tensor_slots = [i for i, v in enumerate(out_leaves) if isinstance(v, torch.Tensor)]
        self.out_constants = {i: v for i, v in enumerate(out_leaves)
                              if not isinstance(v, torch.Tensor)}
        return tuple(out_leaves[i] for i in self.out_tensor_slots)

    def rebuild(self, tensors) -> Any:
        leaves = [None] * (len(self.out_tensor_slots) + len(self.out_constants))
        for slot, tensor in zip(self.out_tensor_slots, tensors):
            leaves[slot] = tensor
        for slot, value in self.out_constants.items():
            leaves[slot] = value
        return pytree.tree_unflatten(leaves, self.out_spec)
