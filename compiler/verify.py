"""``verify=True``: run the graph after every pass and name the first that
changes the numbers.

References come from the graph as captured, run on the caller's real
inputs (random tangents for the backward). Each later stage runs on the
same inputs and is compared output by output: relative error
``||got - ref|| / ||ref||`` within a tolerance per dtype, integers and
booleans exactly, and a NaN where the reference has none always fails.
"""

from __future__ import annotations

import contextlib

from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

__all__ = ["VerificationError", "compare", "run_graph", "run_program", "same_random_numbers",
           "TOLERANCE"]

#: Relative error allowed per dtype (fused code may reorder float math).
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-2,
             torch.bfloat16: 1e-2}


class VerificationError(AssertionError):
    """A pass changed what the graph computes."""


@contextlib.contextmanager
def same_random_numbers():
    """Every stage draws the same seeds (retrograd's uniform draws are a pure
    function of them, compiler/rng.py); the caller's generator is restored."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        yield


def run_graph(gm: fx.GraphModule, inputs: Sequence[Any]) -> list:
    """Run ``gm`` on flat inputs, whatever its pytree signature."""
    with torch.no_grad(), same_random_numbers():
        result = fx.Interpreter(gm).run(*inputs, enable_io_processing=False)
    return list(result) if isinstance(result, (list, tuple)) else [result]


def run_program(executable, inputs: Sequence[Any]) -> list:
    """Run a compiled program (boxed) on a copy of the inputs list, seeded as above."""
    with torch.no_grad(), same_random_numbers():
        return list(executable(list(inputs)))


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    scale = ref.norm().item()
    return (got - ref).norm().item() / (scale if scale > 0 else 1.0)


def compare(stage: str, got: Sequence[Any], ref: Sequence[Any],
            names: Callable[[int], str] = str) -> None:
    """Raise VerificationError naming ``stage`` and the output that differs."""
    if len(got) != len(ref):
        raise VerificationError(
            f"retrograd verify: after pass {stage!r} the graph returns {len(got)} values, "
            f"expected {len(ref)}")
    for index, (a, b) in enumerate(zip(got, ref)):
        if not isinstance(b, torch.Tensor) or not isinstance(a, torch.Tensor):
            continue
        where = f"output {names(index)} (shape {tuple(b.shape)}, {b.dtype})"
        if a.shape != b.shape:
            raise VerificationError(f"retrograd verify: pass {stage!r} changed the shape of "
                                    f"{where} to {tuple(a.shape)}")
        if not b.is_floating_point():
            if not torch.equal(a.cpu(), b.cpu()):
                raise VerificationError(f"retrograd verify: pass {stage!r} changed {where}")
            continue
        if bool(torch.isnan(a).any()) and not bool(torch.isnan(b).any()):
            raise VerificationError(f"retrograd verify: pass {stage!r} produced NaN in {where}")
        finite = torch.isfinite(b)
        error = _relative_error(torch.where(finite, a, 0), torch.where(finite, b, 0))
        if error > TOLERANCE.get(b.dtype, 1e-5):
            raise VerificationError(
                f"retrograd verify: pass {stage!r} changed {where}: relative error "
                f"{error:.3g} > {TOLERANCE.get(b.dtype, 1e-5):g}")
