"""One OpInfo sample through retrograd and through eager, compared; and the
verdict on a whole OpInfo. Shared by ``tests/test_opinfo.py`` (the curated
list and the rotating sample of the whole database) and
``benchmarks/opinfo_sweep.py`` (the whole database, written to docs/opinfo.md).

A sample is run as a closure over its non-tensor arguments taking its
tensors positionally (retrograd specializes on the constants anyway). Both
runs see the same upstream gradient (``randn_like`` of each float output);
outputs and the gradient of every input that requires grad are compared by
``compare``: exact for integers and booleans, same NaN and inf positions,
``||got - ref|| / ||ref|| < TOLERANCE`` on the finite rest, or, where float32
eager is itself far from float64, no further from float64 than eager is.

Verdicts (``classify``): ``pass`` (right, and some sample ran a generated
Triton kernel), ``extern-only`` (right, every node ran as an extern aten
call), ``xfail`` (retrograd refused with its own UnsupportedError: a clean,
documented limit), ``wrong`` (a value or gradient differs from eager),
``crash`` (any other exception: an internal error), ``skip`` (no usable
sample: eager refuses it, or every sample is empty or too large).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import warnings
from dataclasses import dataclass, field

import retrograd
import torch
import torch.utils._pytree as pytree
from checks import recording_graphs, relative_error

TOLERANCE = 1e-4
MAX_NUMEL = 20000
FACES = ("compile", "torch.compile")
SEED = 1234


class Mismatch(AssertionError):
    """retrograd's value or gradient differs from eager's."""


# ---------------------------------------------------------------- samples
def op_id(op) -> str:
    return op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")


def autograd_opinfos() -> list:
    """Every OpInfo with a float32 CPU backward, sorted by id."""
    from torch.testing._internal.common_methods_invocations import op_db
    found = [op for op in op_db if op.supports_autograd
             and torch.float32 in op.supported_dtypes("cpu")]
    return sorted(found, key=op_id)


def tensors_of(sample) -> list[torch.Tensor]:
    leaves = pytree.tree_leaves((sample.input, sample.args, sample.kwargs))
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def spread(n: int) -> list[int]:
    """0..n-1, starting with the first, last and middle, then bisecting: the
    first few picks span the OpInfo's list (small to large, plain to keyword-heavy)."""
    order, seen = [], set()
    for index in itertools.chain([0, n - 1, n // 2],
                                 (i * n // d for d in (4, 8, 16) for i in range(1, d))):
        if 0 <= index < n and index not in seen:
            seen.add(index)
            order.append(index)
    return order + [i for i in range(n) if i not in seen]


def closure(op, sample):
    """``op(input, *args, **kwargs)`` as a function of the sample's tensors only."""
    leaves, spec = pytree.tree_flatten((sample.input, sample.args, sample.kwargs))
    slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    constants = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]

    def function(*tensors):
        filled = list(constants)
        for slot, tensor in zip(slots, tensors):
            filled[slot] = tensor
        value, args, kwargs = pytree.tree_unflatten(filled, spec)
        return op.op(value, *args, **kwargs)

    return function, [leaves[i] for i in slots]


def describe(sample) -> str:
    def show(value):
        if isinstance(value, torch.Tensor):
            return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(show(v) for v in value) + "]"
        return repr(value)
    parts = [show(sample.input)] + [show(a) for a in sample.args] + [
        f"{k}={show(v)}" for k, v in sample.kwargs.items()]
    return "(" + ", ".join(parts) + ")"


def outputs_of(result) -> list:
    return [leaf for leaf in pytree.tree_leaves(result) if isinstance(leaf, torch.Tensor)]


def run(function, tensors, upstream):
    """Outputs of ``function(*tensors)`` and the gradients of the inputs that
    require grad, for the given upstream gradients (one per float output)."""
    outputs = outputs_of(function(*tensors))
    wrt = [t for t in tensors if t.requires_grad]
    pairs = [(o, g) for o, g in zip(outputs, upstream) if g is not None and o.requires_grad]
    grads = [None] * len(wrt)
    if wrt and pairs:
        grads = list(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                         allow_unused=True))
    return [o.detach() for o in outputs], grads


def unusable(op, sample, extra=None) -> str | None:
    """Why a sample is left out, or None. ``extra(op, sample)`` may add reasons."""
    tensors = tensors_of(sample)
    if not tensors:
        return "no tensor argument"
    if any(t.is_complex() for t in tensors):
        return "complex tensor"
    if any(t.numel() == 0 for t in tensors):
        return "zero-size tensor"
    if any(t.numel() > MAX_NUMEL for t in tensors):
        return f"more than {MAX_NUMEL} elements"
    reason = extra(op, sample) if extra is not None else None
    if reason is not None:
        return reason
    function, tensors = closure(op, sample)
    try:   # eager must take it, forward and backward, or there is nothing to compare
        outputs = outputs_of(function(*tensors))
        run(function, tensors, [torch.ones_like(o) if o.is_floating_point() and o.requires_grad
                                else None for o in outputs])
    except Exception as exc:
        return f"eager raises {type(exc).__name__}"
    return None


def pick_samples(op, count: int, dtype=torch.float32, considered: int = 200, extra=None):
    """Up to ``count`` usable samples spread over the OpInfo's list, and the
    reasons (with counts) the others looked at were left out."""
    requires_grad = op.supports_autograd and dtype.is_floating_point
    samples = list(itertools.islice(op.sample_inputs("cpu", dtype, requires_grad=requires_grad),
                                    considered))
    reasons: dict[str, int] = {}
    chosen = []
    for index in spread(len(samples)):
        if len(chosen) == count:
            break
        reason = unusable(op, samples[index], extra)
        if reason is None:
            chosen.append(samples[index])
        else:
            reasons[reason] = reasons.get(reason, 0) + 1
    return chosen, reasons


# ---------------------------------------------------------------- comparison
def _check(condition: bool, message: str) -> None:
    if not condition:
        raise Mismatch(message)


def compare(what: str, got, ref, precise=None, scale: float = 0.0) -> None:
    """Exact for integers and booleans; for floats the same NaN and inf
    positions and a relative error under TOLERANCE on the finite rest.

    ``precise()`` gives the same value computed in float64 (or None). Some
    results are ill-conditioned (the gradient of a layer norm over two
    elements is mostly rounding noise), so float32 eager is itself far from
    the truth: where retrograd and eager disagree, retrograd still passes if
    it is no further from the float64 value than eager is (a factor of 3, as
    Inductor's accuracy checks allow).

    ``scale`` is the root-mean-square of the other outputs and gradients: a
    value that is mathematically zero (the input gradient of a layer norm over
    two elements) is rounding noise, judged against that scale times
    ``sqrt(numel)``, not against itself.
    """
    if ref is None:   # eager's gradient is None: retrograd's must be None or zero
        _check(got is None or not bool(_dense(got).any()), f"{what}: eager has none, got {got}")
        return
    _check(isinstance(got, torch.Tensor), f"{what}: expected a tensor, got {type(got).__name__}")
    _check(got.dtype == ref.dtype, f"{what}: dtype {got.dtype} != eager's {ref.dtype}")
    _check(got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}")
    got, ref = _dense(got), _dense(ref)
    if ref.is_complex():   # real and imaginary parts side by side (complex32 included)
        exact = precise
        precise = None if exact is None else lambda: _as_real(exact())
        got, ref = _as_real(got), _as_real(ref)
    if not ref.is_floating_point():
        _check(torch.equal(got, ref), f"{what}: values differ\n got {got}\n ref {ref}")
        return
    _check(torch.equal(got.isnan(), ref.isnan()),
           f"{what}: NaN positions differ\n got {got}\n ref {ref}")
    infinite = ref.isinf()
    _check(torch.equal(got[infinite], ref[infinite]), f"{what}: infinities differ")
    _check(bool(got[ref.isfinite()].isfinite().all()), f"{what}: a finite value became inf/NaN")
    floor = scale * ref.numel() ** 0.5
    error = relative_error(got, ref, floor)
    if error < TOLERANCE:
        return
    detail = ""
    exact = precise() if precise is not None else None
    if exact is not None:
        ours, eager = relative_error(got, exact, floor), relative_error(ref, exact, floor)
        if ours <= max(TOLERANCE, 3 * eager):
            return
        detail = f" (against float64: retrograd {ours:.3g}, eager {eager:.3g})"
    raise Mismatch(f"{what}: relative error {error:.3g} >= {TOLERANCE:g}{detail}\n"
                   f" got {got}\n ref {ref}")


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_dense() if tensor.layout != torch.strided else tensor


def _as_real(tensor):
    if tensor is None or not tensor.is_complex():
        return tensor
    return torch.view_as_real(tensor.detach().resolve_conj().to(torch.complex128))


def float64_run(function, tensors, upstream):
    """``run`` with float32 tensors (inputs and upstream) as float64; None if
    the op refuses float64."""
    def widen(t):
        if t is None or t.dtype != torch.float32:
            return t
        return t.detach().double().requires_grad_(t.requires_grad)
    try:
        return run(function, [widen(t) for t in tensors], [widen(g) for g in upstream])
    except Exception:
        return None


def _scale(values, this) -> float:
    """The largest root-mean-square of the finite float ``values`` other than ``this``."""
    best = 0.0
    for value in values:
        if value is this or not isinstance(value, torch.Tensor) or value.layout != torch.strided \
                or not value.is_floating_point() or value.numel() == 0:
            continue
        finite = value.detach().double()[value.isfinite()]
        if finite.numel():
            best = max(best, finite.norm().item() / finite.numel() ** 0.5)
    return best


# ---------------------------------------------------------------- faces

def _reports_of(graphs) -> list[dict]:
    return [report for graph in graphs for compiler in graph.compilers.values()
            for report in compiler.reports.values()]


@contextlib.contextmanager
def fixed_seed(seed: int = SEED):
    """Torch's generator at ``seed``, and ``torch.manual_seed`` a no-op inside: the
    OpInfos of random ops reseed inside the op (``wrapper_set_seed``), which a
    trace runs once and does not replay, so eager and compiled runs would
    start from different states."""
    torch.random.default_generator.manual_seed(seed)
    original = torch.manual_seed
    torch.manual_seed = lambda seed: torch.random.default_generator
    try:
        yield
    finally:
        torch.manual_seed = original


def _compiled_run(function, tensors, upstream, face: str, executor: str):
    """``run`` through ``face``; also the compiled graphs' reports."""
    torch._dynamo.reset()
    if face == "compile":   # data-dependent code goes to dynamo: its graphs are recorded
        with recording_graphs() as graphs, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*splits the graph there")
            compiled = retrograd.compile(function, executor=executor)
            outputs, grads = run(compiled, tensors, upstream)
        torch._dynamo.reset()
        return outputs, grads, _reports_of(graphs) if graphs else list(
            compiled.reports.values())
    with recording_graphs() as graphs:
        compiled = torch.compile(function, backend="retrograd", options={"executor": executor})
        outputs, grads = run(compiled, tensors, upstream)
    torch._dynamo.reset()
    return outputs, grads, _reports_of(graphs)


def check_sample(op, sample, face: str = "compile", executor: str = "interpret") -> list[dict]:
    """Compile ``op`` on ``sample`` through ``face``, run it forward and backward,
    compare with eager (raises Mismatch); returns the compiled graphs' reports."""
    function, tensors = closure(op, sample)
    reference = outputs_of(function(*tensors))
    upstream = [torch.randn_like(o) if o.is_floating_point() and o.requires_grad else None
                for o in reference]
    with fixed_seed():   # both runs start from the same generator state
        ref_outputs, ref_grads = run(function, tensors, upstream)
    with fixed_seed():
        got_outputs, got_grads, reports = _compiled_run(function, tensors, upstream, face,
                                                        executor)

    @functools.cache   # run in float64 only if some comparison needs it, and once
    def wide():
        return float64_run(function, tensors, upstream)

    def precise(kind: int, index: int):
        return lambda: None if wide() is None else wide()[kind][index]

    _check(len(got_outputs) == len(ref_outputs),
           f"{len(got_outputs)} outputs, eager has {len(ref_outputs)}")
    values = list(ref_outputs) + list(ref_grads)
    for index, (got, ref) in enumerate(zip(got_outputs, ref_outputs)):
        compare(f"output {index}", got, ref, precise(0, index), _scale(values, ref))
    positions = [i for i, t in enumerate(tensors) if t.requires_grad]
    for index, (position, got, ref) in enumerate(zip(positions, got_grads, ref_grads)):
        compare(f"gradient of tensor input {position}", got, ref, precise(1, index),
                _scale(values, ref))
    return reports


# ---------------------------------------------------------------- verdicts
@dataclass
class Verdict:
    """What one OpInfo did through the faces."""

    op: str
    status: str                      # pass, extern-only, xfail, wrong, crash, skip
    detail: str = ""
    samples: int = 0
    triton: int = 0
    extern_ops: set = field(default_factory=set)
    faces: dict = field(default_factory=dict)   # face -> status


def clean_refusal(exc: BaseException) -> BaseException | None:
    """retrograd's own UnsupportedError in ``exc``'s chain (dynamo wraps a
    backend's error), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ == "UnsupportedError" and type(exc).__module__.startswith(
                "retrograd"):
            return exc
        exc = exc.__cause__ or getattr(exc, "inner_exception", None) or exc.__context__
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


RANK = {"crash": 0, "wrong": 1, "xfail": 2, "extern-only": 3, "pass": 4}


def classify(op, count: int = 1, faces=FACES, executor: str = "interpret",
             seed: int = 0, extra=None) -> Verdict:
    """Run up to ``count`` samples of ``op`` through each face; the verdict is
    the worst of all runs (crash < wrong < xfail < extern-only < pass)."""
    torch.manual_seed(seed)
    try:
        samples, reasons = pick_samples(op, count, extra=extra)
    except Exception as exc:   # the OpInfo's own sample generator failed
        return Verdict(op_id(op), "skip", f"sample_inputs raises {_first_line(exc)}")
    if not samples:
        return Verdict(op_id(op), "skip", f"no usable sample: {reasons}")
    verdict = Verdict(op_id(op), "pass", samples=len(samples))
    for face in faces:
        verdict.faces[face] = "pass"
        for sample in samples:
            status, detail = _one(op, sample, face, executor, verdict)
            if RANK[status] < RANK[verdict.faces[face]]:
                verdict.faces[face] = status
            if RANK[status] < RANK[verdict.status]:
                verdict.status = status
                verdict.detail = f"{face} on {describe(sample)}: {detail}"
    if verdict.status == "pass" and verdict.triton == 0:
        verdict.status = "extern-only"
        verdict.faces = {face: "extern-only" if s == "pass" else s
                         for face, s in verdict.faces.items()}
    return verdict


def is_random(op, sample) -> bool:
    """Eager gives other values under another seed: the op draws random numbers.
    (OpInfos of random ops reseed inside the op, ``wrapper_set_seed``, which a
    trace does not replay: that reseeding is turned off for this check.)"""
    function, tensors = closure(op, sample)
    values = []
    for seed in (1, 2):
        with fixed_seed(seed), torch.no_grad():
            values.append([_dense(o) for o in outputs_of(function(*tensors))])
    return any(not torch.equal(a, b) for a, b in zip(*values))


def _one(op, sample, face, executor, verdict) -> tuple[str, str]:
    try:
        reports = check_sample(op, sample, face, executor)
    except Mismatch as exc:
        if is_random(op, sample):
            return "xfail", ("random op: retrograd's uniform draws are its own stream "
                             "(a seed from torch's generator, then Philox), so its values "
                             "differ from eager's: " + _first_line(exc))
        return "wrong", _first_line(exc)
    except Exception as exc:
        refusal = clean_refusal(exc)
        if refusal is not None:
            return "xfail", _first_line(refusal)
        return "crash", _first_line(exc)
    for report in reports:
        verdict.triton += report["kernels"]["triton"]
        verdict.extern_ops.update(report["kernels"]["extern_ops"])
    return "pass", ""
