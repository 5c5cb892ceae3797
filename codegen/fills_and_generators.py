"""Ops whose values come from no tensor's values: constant fills, ``arange``
and the uniform draw.

Codegen writes a fill as a literal (``fill_value``), an ``arange`` or a draw
from the element's position (``is_generator``), and reads only the shape of
their tensor arguments (``reads_shape_only``), so fusion can take them
without loading those arguments. The lowerings themselves are in ops.py.
"""

from __future__ import annotations

from typing import Any

import torch

from retrograd.codegen.triton_types import TRITON_DTYPES

__all__ = ["FILL_OPS", "RANDOM_OPS", "is_fill", "fill_value", "held_as", "is_random",
           "is_generator", "reads_shape_only"]

aten = torch.ops.aten

FILL_OPS = {aten.full.default, aten.full_like.default, aten.scalar_tensor.default,
            aten.zeros_like.default, aten.ones_like.default, aten.fill.Scalar,
            aten.zeros.default, aten.ones.default, aten.new_zeros.default,
            aten.new_ones.default, aten.new_full.default}


def is_fill(node) -> bool:
    """A constant fill codegen can write as a literal: not a complex one (no
    complex registers in Triton), which stays an extern call."""
    if getattr(node, "target", None) not in FILL_OPS:
        return False
    val = node.meta.get("val")
    return not isinstance(val, torch.Tensor) or val.dtype in TRITON_DTYPES


def fill_value(node) -> Any:
    """The one value every element of a fill node holds."""
    target = node.target
    if target in (aten.zeros_like.default, aten.zeros.default, aten.new_zeros.default):
        value = 0
    elif target in (aten.ones_like.default, aten.ones.default, aten.new_ones.default):
        value = 1
    elif target in (aten.full.default, aten.full_like.default, aten.fill.Scalar,
                    aten.new_full.default):
        value = node.args[1]
    else:  # scalar_tensor
        value = node.args[0]
    return held_as(value, node.meta["val"].dtype)


def held_as(value, dtype: torch.dtype) -> Any:
    """``value`` as an element of ``dtype`` holds it, converted the way torch
    converts (0.1 in bfloat16 is 0.10009765625; 2.7 in int32 is 2), as a
    Python number."""
    wide = torch.float64 if isinstance(value, float) else None
    return torch.tensor(value, dtype=wide).to(dtype).item()


#: Uniform [0, 1) per element: ``retrograd.uniform(like, seed, offset)``, the
#: counter-based generator keyed by a seed tensor that the decompositions
#: draw from torch's generator (compiler/rng.py; the kernel writer emits it).
RANDOM_OPS = ("retrograd.uniform.default",)


def is_random(node) -> bool:
    return str(getattr(node, "target", "")) in RANDOM_OPS


def is_generator(node) -> bool:
    """Ops whose value depends on the element's position (they use ``offsets``)."""
    return is_random(node) or getattr(node, "target", None) in (
        aten.arange.start_step, aten.arange.start, aten.arange.default)


def reads_shape_only(node, arg=None) -> bool:
    """Fills look at their tensor argument's shape, not its values; a uniform
    draw looks at its ``like`` argument's shape (its seed is read)."""
    if is_random(node):
        return arg is None or arg is node.args[0]
    return is_fill(node)
