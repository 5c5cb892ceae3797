"""``verify=True``: run the graph after every pass and name the first that
changes the numbers.

The first stage, ``joint``, checks the decomposed joint graph itself: its
forward outputs and gradients, on the caller's real inputs and random
tangents, against eager autograd on the module as captured
(``eager_joint``: ``torch.autograd.grad`` with the same tangents), so a
wrong decomposition is caught there and not taken as the truth. The joint
graph's outputs are then the reference of every later stage, run on the
same inputs and compared output by output: relative error
``||got - ref|| / max(||ref||, floor)`` within a tolerance per dtype
(both from compiler/numerics.py, which the tests use too), integers and
booleans exactly, and a NaN where the reference value is not NaN always
fails. The floor is the root-mean-square of the largest other float output
times ``sqrt(numel)``: a value that is mathematically zero (the gradient
of a convolution bias that feeds a BatchNorm) is only rounding noise, and
noise is judged against the scale of the rest, not against itself (the
tests' floor-relative comparisons do the same).
"""

from __future__ import annotations

import contextlib

from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from retrograd.numerics import TOLERANCE, relative_error, tolerance, wide as _wide

__all__ = ["VerificationError", "compare", "run_graph", "run_program", "same_random_numbers",
           "eager_joint", "is_random_graph", "check_joint", "TOLERANCE"]


class VerificationError(AssertionError):
    """A pass changed what the graph computes; ``stage`` names the pass (or
    ``joint``, ``codegen``), which reproducers compare."""

    def __init__(self, message: str, stage: str = ""):
        super().__init__(message)
        self.stage = stage


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


def _floors(ref: Sequence[Any]) -> list[float]:
    """Per output: the largest root-mean-square of the *other* finite float
    outputs, times ``sqrt(numel)`` (the norm this output would have at that scale)."""
    rms = []
    for value in ref:
        if isinstance(value, torch.Tensor) and _is_float(value) and value.numel():
            wide = _wide(value)
            finite = wide[torch.isfinite(wide)]
            rms.append(finite.norm().item() / max(finite.numel(), 1) ** 0.5)
        else:
            rms.append(0.0)
    return [max((r for j, r in enumerate(rms) if j != i), default=0.0)
            * (value.numel() ** 0.5 if isinstance(value, torch.Tensor) else 0.0)
            for i, value in enumerate(ref)]


def _is_float(value: torch.Tensor) -> bool:
    return value.is_floating_point() or value.is_complex()


def _label(stage: str) -> str:
    if stage == "joint":
        return ("stage 'joint' (the decomposed joint graph against eager autograd on the "
                "captured graph)")
    return f"pass {stage!r}"


def compare(stage: str, got: Sequence[Any], ref: Sequence[Any],
            names: Callable[[int], str] = str) -> None:
    """Raise VerificationError naming ``stage`` and the output that differs."""
    if len(got) != len(ref):
        raise VerificationError(
            f"retrograd verify: after {_label(stage)} the graph returns {len(got)} values, "
            f"expected {len(ref)}", stage)
    floors = _floors(ref)
    for index, (a, b) in enumerate(zip(got, ref)):
        if not isinstance(b, torch.Tensor) or not isinstance(a, torch.Tensor):
            continue
        where = f"output {names(index)} (shape {tuple(b.shape)}, {b.dtype})"
        if a.shape != b.shape:
            raise VerificationError(f"retrograd verify: {_label(stage)} changed the shape of "
                                    f"{where} to {tuple(a.shape)}", stage)
        if not _is_float(b):
            if not torch.equal(a.cpu(), b.cpu()):
                raise VerificationError(f"retrograd verify: {_label(stage)} changed {where}",
                                        stage)
            continue
        a, b = _wide(a), _wide(b)
        if bool((torch.isnan(a) & ~torch.isnan(b)).any()):
            raise VerificationError(f"retrograd verify: {_label(stage)} produced NaN in {where}",
                                    stage)
        error = relative_error(a, b, floors[index])     # over b's finite entries
        limit = tolerance(ref[index].dtype)
        if error > limit:
            raise VerificationError(
                f"retrograd verify: {_label(stage)} changed {where}: relative error "
                f"{error:.3g} > {limit:g}", stage)


def is_random_graph(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` draws random numbers: retrograd's draws (a seed and
    ``retrograd::uniform``) are not eager's, so eager cannot be its reference."""
    for node in gm.graph.nodes:
        tags = getattr(node.target, "tags", ()) if node.op == "call_function" else ()
        if torch.Tag.nondeterministic_seeded in tags or str(node.target).startswith("retrograd."):
            return True
    return False


def eager_joint(module: torch.nn.Module, real_primals: Sequence[Any], tangents: Sequence[Any],
                num_fwd_outputs: int, num_outputs: int) -> list | None:
    """The joint graph's outputs computed by eager autograd on ``module``.

    ``real_primals`` are the caller's tensors in AOTAutograd's primal order
    (parameters, buffers, inputs; their ``requires_grad`` says which get a
    gradient). The module runs on copies (``functional_call``: the caller's
    buffers are not updated), then ``torch.autograd.grad`` of its outputs
    with ``tangents``. Laid out as the joint graph: values of inputs the
    module updated in place, then its outputs (``num_fwd_outputs`` in all),
    then one gradient per primal (None where none is wanted). Returns None
    when the layouts cannot be matched (tokens, aliased outputs, tied
    parameters): the joint stage is then skipped.
    """
    names = [name for name, _ in module.named_parameters(remove_duplicate=False)] + \
        [name for name, _ in module.named_buffers(remove_duplicate=False)]
    if num_outputs != num_fwd_outputs + len(real_primals) or len(real_primals) < len(names):
        return None
    copies = [p.detach().clone().requires_grad_(p.requires_grad and _is_float(p))
              if isinstance(p, torch.Tensor) else p for p in real_primals]
    versions = [c._version if isinstance(c, torch.Tensor) else None for c in copies]
    with torch.enable_grad(), same_random_numbers():
        state = dict(zip(names, copies[:len(names)]))
        result = torch.func.functional_call(module, state, tuple(copies[len(names):]),
                                            tie_weights=False, strict=False)
    outputs = list(result) if isinstance(result, (list, tuple)) else [result]
    # written in place: the version counter moved (not always: batch norm's
    # running statistics are written below autograd) or the values changed
    updated = [c for c, v, p in zip(copies, versions, real_primals) if isinstance(c, torch.Tensor)
               and (c._version != v or not torch.equal(c.detach(), p.detach()))]
    forward = updated + outputs
    differentiable = [o for o in forward if isinstance(o, torch.Tensor) and o.requires_grad]
    if len(forward) != num_fwd_outputs or len(differentiable) != len(tangents) or any(
            o.shape != t.shape for o, t in zip(differentiable, tangents)):
        return None
    wrt = [(i, c) for i, c in enumerate(copies) if isinstance(c, torch.Tensor) and c.requires_grad]
    grads = [None] * len(copies)
    if wrt and differentiable:
        found = torch.autograd.grad(differentiable, [c for _, c in wrt], list(tangents),
                                    allow_unused=True)
        for (i, copy), grad in zip(wrt, found):
            grads[i] = grad if grad is not None else torch.zeros_like(copy)
    return [o.detach() if isinstance(o, torch.Tensor) else o for o in forward] + grads


def check_joint(module, real_primals, joint: fx.GraphModule, reference: list,
                tangents: list, num_fwd_outputs: int) -> str | None:
    """The ``joint`` stage: raise VerificationError if the joint graph's
    outputs (``reference``) differ from eager autograd's; returns why the
    stage was skipped, or None when it ran."""
    if module is None or real_primals is None:
        return "the captured module or the caller's inputs are not known"
    if is_random_graph(joint):
        return "it draws random numbers (retrograd's draws are not eager's)"
    expected = eager_joint(module, real_primals, tangents, num_fwd_outputs, len(reference))
    if expected is None:
        return "its inputs and outputs do not line up with the module's"
    names = lambda i: (f"{i} (forward output {i})" if i < num_fwd_outputs  # noqa: E731
                       else f"{i} (gradient of primal {i - num_fwd_outputs})")
    compare("joint", reference, expected, names)
    return None
