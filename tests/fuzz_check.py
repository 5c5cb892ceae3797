"""The differential check of the fuzzer: a program compiled by retrograd
against eager PyTorch, forward outputs and gradients.

Three runs of the same program on the same inputs:

- ``compiled``: ``retrograd.compile(fn, executor="interpret")`` (generated Triton,
  under the interpreter on CPU), or ``torch.compile(fn, backend="retrograd")``;
- ``eager``: the program as written, in its own dtypes;
- ``wide``: the reference: every floating input widened to float64 and every
  cast in the program to a floating dtype made a cast to float64, so it
  computes in float64 throughout.

Integer and boolean outputs must equal eager's. A floating output (or the
gradient of a floating input that requires grad, under one random upstream
gradient per output shared by all runs) must have eager's dtype and shape,
NaN where eager has NaN, and elsewhere::

    |compiled - wide| <= TOLERANCE[dtype] * max(|wide|.max(), FLOOR) + SLACK * |eager - wide|.max()

so compiled code must be about as close to float64 as eager is, and within
a few units of its dtype's rounding of the largest element (values are kept
O(1) by the generator, so FLOOR = 1 makes mathematically-zero results pass
on rounding noise alone). A failure raises ``FuzzFailure`` whose message is
the program's source and what differs.
"""

from __future__ import annotations

import retrograd
import torch
from hypothesis import reject

__all__ = ["FLOOR", "SLACK", "TOLERANCE", "FuzzFailure", "check"]

TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-4, torch.float16: 4e-3,
             torch.bfloat16: 3e-2}
FLOOR = 1.0
SLACK = 2.0


class FuzzFailure(AssertionError):
    """Compiled and eager disagree (or compiling raised) on a fuzzed program."""


def _widen(x: torch.Tensor) -> torch.Tensor:
    if not x.is_floating_point():
        return x
    return x.detach().double().requires_grad_(x.requires_grad)


def _compile(fn, face: str):
    if face == "compile":
        return retrograd.compile(fn, executor="interpret")
    if face == "torch.compile":
        torch._dynamo.reset()
        return torch.compile(fn, backend="retrograd", dynamic=False,
                             options={"executor": "interpret"})
    raise ValueError(f"face: expected 'compile' or 'torch.compile', got {face!r}")


def _run(fn, inputs) -> list:
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return list(outputs)


def _gradients(outputs, inputs, upstream) -> list:
    """The gradients of the ``inputs`` that require grad (None where unused)."""
    pairs = [(o, u) for o, u in zip(outputs, upstream) if u is not None]
    wanted = [x for x in inputs if x.requires_grad]
    if not wanted:
        return []
    if not pairs:
        return [None] * len(wanted)
    for index, (o, _) in enumerate(pairs):
        if not o.requires_grad:
            raise FuzzFailure(f"an output that eager differentiates does not require grad "
                              f"(output {index})")
    return list(torch.autograd.grad([o for o, _ in pairs], wanted,
                                    [u.to(o.dtype) for o, u in pairs], allow_unused=True))


def _upstream(outputs) -> list:
    generator = torch.Generator().manual_seed(1234)
    return [torch.randn(o.shape, generator=generator, dtype=torch.float64).to(o.dtype)
            if o.is_floating_point() and o.requires_grad else None for o in outputs]


def _reference(fn, inputs, upstream, eager_out, eager_grads):
    """Outputs and gradients of the float64 run; eager's where the program
    cannot run widened."""
    try:
        wide_inputs = [_widen(x) for x in inputs]
        wide_out = _run(fn, wide_inputs)
        return wide_out, _gradients(wide_out, wide_inputs, upstream)
    except RuntimeError:
        return eager_out, eager_grads


def compare(what: str, got, eager, wide) -> str | None:
    """Why ``got`` is not close enough to the reference, or None."""
    if eager is None and got is None:
        return None
    if got is None:
        got = torch.zeros_like(eager)
    if eager is None:
        eager, wide = torch.zeros_like(got), torch.zeros_like(got, dtype=torch.float64)
    if not isinstance(got, torch.Tensor):
        return f"{what}: expected a tensor, got {type(got).__name__}"
    if got.dtype != eager.dtype or got.shape != eager.shape:
        return (f"{what}: {got.dtype} {tuple(got.shape)} where eager has "
                f"{eager.dtype} {tuple(eager.shape)}")
    if not eager.is_floating_point():
        return None if torch.equal(got, eager) else f"{what}: values differ\n{got}\n{eager}"
    got64, eager64, wide64 = (t.detach().double() for t in (got, eager, wide))
    if not torch.equal(got64.isnan(), eager64.isnan()):
        return f"{what}: NaN positions differ\n{got}\n{eager}"
    finite = wide64.isfinite() & ~eager64.isnan()
    if not finite.any():
        return None
    error = (got64 - wide64)[finite].abs().max().item()
    eager_error = (eager64 - wide64)[finite].abs().max().item()
    scale = max(wide64[finite].abs().max().item(), FLOOR)
    allowed = TOLERANCE[got.dtype] * scale + SLACK * eager_error
    if not error <= allowed:   # (a NaN error fails too)
        return (f"{what} ({got.dtype}): max |compiled - float64| = {error:.3g} > {allowed:.3g} "
                f"(eager's error {eager_error:.3g}, scale {scale:.3g})\ncompiled: {got}\n"
                f"float64:  {wide}")
    return None


def check(program, face: str = "compile") -> None:
    """Run ``program`` (a FuzzProgram) compiled, eager and in float64; raise
    FuzzFailure with its source and every difference found."""
    fn, make_inputs = program.build()
    inputs = make_inputs()   # each run draws its own: the same values and strides
    try:   # a program eager rejects (forward or backward) is not a test case
        eager_inputs = make_inputs()
        eager_out = _run(fn, eager_inputs)
        upstream = _upstream(eager_out)
        eager_grads = _gradients(eager_out, eager_inputs, upstream)
    except RuntimeError:
        reject()
    wide_fn, _ = program.build(wide=True)
    wide_out, wide_grads = _reference(wide_fn, inputs, upstream, eager_out, eager_grads)
    try:
        compiled_inputs = make_inputs()
        got = _run(_compile(fn, face), compiled_inputs)
        problems = [] if len(got) == len(eager_out) else [
            f"{len(got)} outputs where eager has {len(eager_out)}"]
        problems += [compare(f"output {i}", g, e, w)
                     for i, (g, e, w) in enumerate(zip(got, eager_out, wide_out))]
        got_grads = _gradients(got, compiled_inputs, upstream)
        names = [i for i, x in enumerate(inputs) if x.requires_grad]
        problems += [compare(f"grad of input {n}", g, e, w) for n, g, e, w
                     in zip(names, got_grads, eager_grads, wide_grads)]
        problems += [compare(f"input {n} after the call", g, e, e)   # in-place writes
                     for n, (g, e) in enumerate(zip(compiled_inputs, eager_inputs))]
    except FuzzFailure as failure:
        problems = [str(failure)]
    except Exception as error:
        raise FuzzFailure(f"{face} raised {type(error).__name__} on\n\n{program.source}") from error
    problems = [p for p in problems if p]
    if problems:
        raise FuzzFailure(f"{face} differs from eager on\n\n{program.source}\n"
                          + "\n".join(problems))
