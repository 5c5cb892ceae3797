"""How close a result is to its reference: one relative error and one
tolerance table, for ``verify=True`` (compiler/verify.py), the tests
(tests/checks.py re-exports both) and the benchmarks.

The measure is ``||got - ref|| / max(||ref||, floor)`` in float64
(complex128 for complex tensors), over the entries where the reference is
finite. ``floor`` is a scale for values that are mathematically zero: their
rounding noise is judged against the scale of the other results, not against
itself. NaN and inf positions are the caller's to compare (checks.assert_close
and verify.compare do so before measuring): this measure only says how far
the finite rest is.
"""

from __future__ import annotations

import math

import torch

__all__ = ["TOLERANCE", "tolerance", "relative_error", "wide"]

#: Relative error allowed per dtype against a float64 (or same-dtype) reference;
#: fused code may reorder float math, and half precisions round each step.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-2,
             torch.bfloat16: 1e-2}


def tolerance(dtype: torch.dtype) -> float:
    """``TOLERANCE[dtype]``; float32's for a dtype the table does not list."""
    return TOLERANCE.get(dtype, TOLERANCE[torch.float32])


def wide(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` detached, on the CPU, as float64 (complex128 if complex),
    with pending conjugation and negation resolved."""
    tensor = tensor.detach().cpu().resolve_conj().resolve_neg()
    return tensor.to(torch.complex128 if tensor.is_complex() else torch.float64)


def relative_error(got, ref, floor: float = 0.0) -> float:
    """``||got - ref|| / max(||ref||, floor)`` over ``ref``'s finite entries
    (the absolute error when that scale is 0), for tensors or numbers. inf
    when the shapes differ or ``got`` is NaN where ``ref`` is finite, so
    ``error < limit`` and ``error > limit`` both read it as a failure."""
    got, ref = torch.as_tensor(got), torch.as_tensor(ref)
    if got.shape != ref.shape:
        return math.inf
    got, ref = wide(got), wide(ref)
    finite = ref.isfinite()
    scale = max(ref[finite].norm().item(), floor)
    error = (got[finite] - ref[finite]).norm().item()
    value = error / scale if scale > 0 else error
    return math.inf if math.isnan(value) else value
