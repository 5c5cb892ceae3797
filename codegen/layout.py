"""Index arithmetic shared by the kernel templates: strides, coordinates,
flat indices. Each returns Triton source text."""

from __future__ import annotations

import math

__all__ = ["contiguous_strides", "coordinates", "flat_index", "next_power_of_two"]


def contiguous_strides(shape) -> tuple[int, ...]:
    """Row-major strides of ``shape``."""
    strides, running = [], 1
    for size in reversed(shape):
        strides.append(running)
        running *= size
    return tuple(reversed(strides))


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def coordinates(shape, lines: list[str], prefix: str) -> list[str]:
    """Emit one variable per dimension of ``shape`` holding each lane's
    coordinate, from the lane's row-major position ``offsets``."""
    names = []
    for dim, size in enumerate(shape):
        inner = math.prod(shape[dim + 1:])
        text = "offsets" if inner == 1 else f"(offsets // {inner})"
        if dim > 0:
            text = f"{text} % {size}"
        names.append(f"{prefix}{dim}")
        lines.append(f"    {prefix}{dim} = {text}")
    return names


def flat_index(coordinates, strides) -> str:
    """Flat index at ``coordinates``; a block of zeros for a 0-dim tensor (the
    interpreter refuses a block mask on a scalar pointer)."""
    terms = [c if s == 1 else f"({c}) * {s}" for c, s in zip(coordinates, strides) if s]
    return " + ".join(terms) or "0 * offsets"
