"""Storage for a program's buffers while it runs.

For now every temporary is its own allocation from torch's caching
allocator, created when its kernel runs and released after its last use
(the wrapper deletes it); the memory plan's offsets are not used yet. The
class is the one place a future arena (one tensor per call, typed views per
buffer) plugs in.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["Allocator"]


class Allocator:
    """The ``rt`` object a program's wrapper calls."""

    def __init__(self, device: torch.device, constants: dict[str, Any] | None = None):
        self.device = device
        self.constants = constants or {}

    def empty(self, shape, strides, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty_strided(shape, strides, dtype=dtype, device=self.device)

    @staticmethod
    def seed() -> int:
        """A key for the generated random streams, drawn from torch's CPU
        generator, so ``torch.manual_seed`` makes runs repeat (no device sync)."""
        return int(torch.randint(0, 2**31 - 1, ()).item())

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
