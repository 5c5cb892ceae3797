"""Triton's spelling of torch values: dtype names, the dtype registers compute
in, and Python scalars as literals.

Every kernel writer (pointwise, reductions, scans, indexing, matmul
templates) renders dtypes and constants through these, so a kernel's loads,
casts and literals agree. Half-precision values are held in float32
registers (``compute_dtype``), as Inductor does; ../shared/TRITON_ON_CPU.md
says why the same source must run in the interpreter.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["TRITON_DTYPES", "FLOATS", "triton_dtype", "compute_dtype", "literal"]

#: torch dtype -> Triton dtype name.
TRITON_DTYPES = {
    torch.float64: "tl.float64", torch.float32: "tl.float32",
    torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16",
    torch.int64: "tl.int64", torch.int32: "tl.int32", torch.int16: "tl.int16",
    torch.int8: "tl.int8", torch.uint8: "tl.uint8", torch.bool: "tl.int1",
}

FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def triton_dtype(dtype: torch.dtype) -> str:
    return TRITON_DTYPES[dtype]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Registers hold half-precision values as float32 (Inductor does the same)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def literal(value: Any) -> str:
    """A Python scalar as Triton source text."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        if math.isnan(value):
            return 'float("nan")'
        if math.isinf(value):
            return 'float("inf")' if value > 0 else 'float("-inf")'
        return repr(value)
    if isinstance(value, int):
        return str(value)
    raise TypeError(f"retrograd codegen: cannot write {value!r} ({type(value).__name__}) "
                    "as a literal")
