"""Storage for a program's buffers while it runs.

Planned temporaries live in one arena per program call: a single byte
tensor from torch's caching allocator, allocated when the call starts and
released when its last view dies, with a typed, strided view per buffer at
the offset the memory plan chose. Allocating per call (rather than keeping
the arena across calls) keeps calls re-entrant and safe from several
threads at once (no two calls ever share a buffer), and lets the caching
allocator hand the same block back each time. Buffers outside the plan
(escaping values, extern results) are ordinary tensors.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["Allocator", "Arena"]


class Arena:
    """One call's arena: typed, strided views at planned byte offsets."""

    def __init__(self, nbytes: int, device: torch.device):
        self.storage = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.typed: dict[torch.dtype, torch.Tensor] = {}

    def view(self, offset: int, shape, strides, dtype: torch.dtype) -> torch.Tensor:
        typed = self.typed.get(dtype)
        if typed is None:
            typed = self.typed[dtype] = self.storage.view(dtype)
        itemsize = typed.element_size()
        return typed.as_strided(shape, strides, offset // itemsize)


class Allocator:
    """The ``rt`` object a program's wrapper calls."""

    def __init__(self, device: torch.device, constants: dict[str, Any] | None = None):
        self.device = device
        self.constants = constants or {}

    def arena(self, nbytes: int) -> Arena:
        return Arena(nbytes, self.device)

    def empty(self, shape, strides, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty_strided(shape, strides, dtype=dtype, device=self.device)

    def constant(self, name: str) -> Any:
        return self.constants[name]

    @staticmethod
    def layout(tensor: torch.Tensor, shape, strides) -> torch.Tensor:
        """``tensor`` with the strides the plan expects (copied only if they differ).

        Extern ops may pick another layout than the fake tensors predicted;
        generated kernels index with the predicted strides, so this restores them.
        """
        if not isinstance(tensor, torch.Tensor) or same_layout(tensor, shape, strides):
            return tensor
        fixed = torch.empty_strided(shape, strides, dtype=tensor.dtype, device=tensor.device)
        fixed.copy_(tensor)
        return fixed


def same_layout(tensor: torch.Tensor, shape, strides) -> bool:
    """Equal shapes and equal strides on every dimension longer than one."""
    if tuple(tensor.shape) != tuple(shape):
        return False
    return all(size <= 1 or a == b for size, a, b in zip(shape, tensor.stride(), strides))
