"""Assertions shared by several test files: numerics against eager (a
compiled function against float64 eager, outputs and gradients, measured
by retrograd.numerics' relative_error and TOLERANCE, re-exported here), the
shape of a Program's schedule, compiling through either face and counting
the graphs it compiles."""

from __future__ import annotations

import contextlib

import torch

import retrograd
import retrograd.backend
import retrograd.trace_cache
from retrograd.ir import Program
# the one measure and tolerance table, shared with verify=True (compiler/numerics.py)
from retrograd.numerics import TOLERANCE, relative_error

__all__ = ["TOLERANCE", "relative_error", "assert_close", "assert_close_floor",
           "check_against_eager", "eager_step", "assert_topological", "FACES", "compile_with",
           "RetraceCounter"]

#: The two faces a test can compile through (``compile_with``).
FACES = ("standalone", "torch.compile")


def assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
                 what: str = "output", tolerance: float | None = None) -> None:
    """``got`` has eager's ``dtype`` and ``ref``'s shape; exact for integers and
    booleans; NaN and inf where ``ref`` has them; small relative error elsewhere."""
    assert isinstance(got, torch.Tensor), f"{what}: expected a tensor, got {type(got)}"
    assert got.dtype == dtype, f"{what}: dtype {got.dtype} != eager's {dtype}"
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if not dtype.is_floating_point:
        assert torch.equal(got, ref.to(dtype)), f"{what}: values differ\n{got}\n{ref}"
        return
    got64, ref64 = got.detach().double(), ref.detach().double()
    assert torch.equal(got64.isnan(), ref64.isnan()), f"{what}: NaN positions differ"
    infinite = ref64.isinf()
    assert torch.equal(got64[infinite], ref64[infinite]), f"{what}: infinities differ"
    assert bool(got64[ref64.isfinite()].isfinite().all()), f"{what}: a finite value became inf/NaN"
    limit = TOLERANCE[dtype] if tolerance is None else tolerance
    error = relative_error(got64, ref64)
    assert error < limit, f"{what}: relative error {error:.3g} >= {limit:g}"


def assert_close_floor(got: torch.Tensor, ref: torch.Tensor, tolerance: float,
                       floor: float = 0.0, what: str = "value") -> None:
    """``max|got - ref| <= tolerance * max(max|ref|, floor)``: relative to the
    largest reference value, with ``floor`` (the scale of the other outputs)
    for values that are mathematically zero and so only rounding noise."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    got64, ref64 = got.detach().double(), ref.detach().double()
    assert torch.equal(got64.isnan(), ref64.isnan()), f"{what}: NaN positions differ"
    scale = max(ref64.abs().max().item() if ref64.numel() else 0.0, floor)
    error = (got64 - ref64).abs().max().item() if ref64.numel() else 0.0
    assert error <= tolerance * scale, \
        f"{what}: max error {error:.3g} > {tolerance:g} x scale {scale:.3g}"


def eager_step(model, optimizer, loss_fn, *batch) -> torch.Tensor:
    """One step of the eager loop that ``retrograd.compile_step`` is compared with."""
    optimizer.zero_grad()
    loss = loss_fn(model, *batch)
    loss.backward()
    optimizer.step()
    return loss


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def check_against_eager(fn, *inputs, grad: bool = True, tolerance: float | None = None,
                        grad_tolerance: float | None = None, **options):
    """Compile ``fn``, compare its outputs (and, with ``grad``, the gradients of
    its floating inputs under random upstream gradients) with eager on float64
    copies of ``inputs``. Output dtypes must be eager's. Returns the compiled
    function (for its reports)."""
    compiled = retrograd.compile(fn, executor="interpret", **options)
    wants = [grad and x.is_floating_point() for x in inputs]
    mine = [x.detach().clone().requires_grad_(w) for x, w in zip(inputs, wants)]
    wide = [(x.detach().double() if x.is_floating_point() else x.detach().clone())
            .requires_grad_(w) for x, w in zip(inputs, wants)]
    with torch.no_grad():
        eager_dtypes = [o.dtype for o in _as_tuple(fn(*[x.detach() for x in inputs]))]
    got, ref = _as_tuple(compiled(*mine)), _as_tuple(fn(*wide))
    assert len(got) == len(ref)
    for index, (g, r, dtype) in enumerate(zip(got, ref, eager_dtypes)):
        assert_close(g, r, dtype, f"output {index}", tolerance)
    if not any(wants):
        return compiled
    pairs = [(g, r) for g, r in zip(got, ref) if g.requires_grad]
    upstream = [torch.randn(g.shape, dtype=torch.float64).to(g.dtype) for g, _ in pairs]
    torch.autograd.backward([g for g, _ in pairs], upstream)
    torch.autograd.backward([r for _, r in pairs], [u.double() for u in upstream])
    for index, (x, x64) in enumerate(zip(mine, wide)):
        if x.requires_grad:
            assert x.grad is not None, f"input {index} got no gradient"
            assert_close(x.grad, x64.grad, x.dtype, f"grad of input {index}", grad_tolerance)
    return compiled


def assert_topological(program: Program) -> None:
    """Every kernel reads only inputs, constants and what earlier kernels wrote."""
    written = set(program.inputs) | set(program.constants)
    for index, kernel in enumerate(program.kernels):
        for name in kernel.inputs:
            assert name in written, f"kernel {index} {kernel.name} reads {name} before it exists"
        written |= set(kernel.outputs)
    for name in program.outputs:
        assert not isinstance(name, str) or name in written


def compile_with(face: str, target, **options):
    """``target`` compiled through ``face`` (one of ``FACES``) with ``options``."""
    if face == "standalone":
        return retrograd.compile(target, **options)
    return torch.compile(target, backend="retrograd", options=options or None)


class RetraceCounter:
    """Counts the graphs retrograd compiles, by patching ``compile_graph`` (and
    ``compile_symbolic``, automatic dynamic shapes) in both faces."""

    def __init__(self, monkeypatch):
        self.calls = 0
        for module in (retrograd.trace_cache, retrograd.backend):
            for name in ("compile_graph", "compile_symbolic"):
                original = getattr(module, name)
                monkeypatch.setattr(module, name, self._counting(original))

    def _counting(self, original):
        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)
        return counted


def _recording_init(seen: list):
    original = retrograd.backend.CompiledGraph.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(self)
    return original, init


@contextlib.contextmanager
def recording_graphs():
    """The torch.compile face's compiled graphs (``backend.CompiledGraph``) made
    inside the block, in order; their ``reports`` count Triton kernels and
    extern calls, their ``compiled`` the programs kept."""
    seen: list = []
    original, init = _recording_init(seen)
    retrograd.backend.CompiledGraph.__init__ = init
    try:
        yield seen
    finally:
        retrograd.backend.CompiledGraph.__init__ = original


def record_graphs(monkeypatch) -> list:
    """``recording_graphs`` for a whole test: the list fills as graphs are made."""
    seen: list = []
    monkeypatch.setattr(retrograd.backend.CompiledGraph, "__init__", _recording_init(seen)[1])
    return seen
