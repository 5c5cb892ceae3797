"""Random programs for the differential fuzzer (tests/test_fuzz.py, benchmarks/fuzz.py).

A program is a short list of torch ops applied to a pool of tensors. The pool
starts with a few random inputs; each op reads values from the pool (or from
fresh inputs it adds: a broadcast partner, an index tensor, attention's keys),
and its results join the pool. Results no later op reads are the outputs.

Every program exists as Python source first (``FuzzProgram.source``), and
``build()`` runs exactly that source, so a failing program prints as code a
developer can paste::

    import torch
    import torch.nn.functional as F

    def fn(x0, i1):
        v0 = torch.sin(x0)
        v1 = torch.gather(v0, 1, i1)
        return v1,

    def make_inputs():
        g = torch.Generator().manual_seed(0)
        x0 = torch.randn((3, 4), generator=g).requires_grad_()
        i1 = torch.randint(0, 4, (3, 2), generator=g)
        return [x0, i1]

Generation evaluates each op eagerly on the current values as it is drawn:
an op eager rejects is left out, and so is one whose result is not finite or
grows past ``MAX_MAGNITUDE`` (the float64 reference and float32 must stay
comparable). Ops that are discontinuous (comparisons, casts to integers,
floor, max's index) are drawn only where both runs must take the same branch:
on *exact* values (inputs and what views, indexing, negation, max/min,
clamps and upcasts make of them, which compiled code reproduces bit for bit)
or where every element is far from the branch point (``stable``).

``programs()`` is the hypothesis strategy; the op generators live in
tests/fuzz_ops.py, fuzz_shapes.py and fuzz_extra.py.
"""

from __future__ import annotations

import hashlib
import linecache
import math
import warnings
from dataclasses import dataclass
from itertools import count

import torch
import torch.nn.functional as F
from hypothesis import assume
from hypothesis import strategies as st

__all__ = [
    "FLOATS",
    "MAX_MAGNITUDE",
    "Builder",
    "FuzzProgram",
    "Value",
    "default_generators",
    "program_from_source",
    "programs",
]

#: Results larger than this (in absolute value) are left out of programs.
MAX_MAGNITUDE = 1e4
#: Input and intermediate element counts stay below this (interpreter speed).
MAX_NUMEL = 512
FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
#: Relative distance from a branch point that float rounding cannot cross.
_MARGIN = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 3e-2,
           torch.bfloat16: 6e-2}
_DTYPE_NAMES = {torch.float32: "torch.float32", torch.float64: "torch.float64",
                torch.bfloat16: "torch.bfloat16", torch.float16: "torch.float16",
                torch.int64: "torch.int64", torch.int32: "torch.int32", torch.bool: "torch.bool"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


@dataclass
class Value:
    """One tensor of the pool: its name in the source and its eager value."""
    name: str
    tensor: torch.Tensor
    exact: bool = False
    grad: bool = False        # requires grad in the real run
    input: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    @property
    def is_float(self) -> bool:
        return self.tensor.dtype in FLOATS


class FuzzProgram:
    """A program's source; ``build()`` executes it into ``(fn, make_inputs)``."""

    def __init__(self, source: str, ops: list[str] | None = None):
        self.source = source
        self.ops = list(ops or [])   # the generators that made it, for statistics

    def __repr__(self) -> str:   # hypothesis prints falsifying examples with repr
        return f"program_from_source('''\n{self.source}''')"

    def build(self, wide: bool = False):
        """``(fn, make_inputs)``; with ``wide``, ``fn`` computes in float64
        throughout (its casts to floating dtypes become casts to float64): the
        reference that eager's and compiled code's rounding are measured against."""
        source = self.source
        for narrow, wider in _WIDEN if wide else ():
            source = source.replace(narrow, wider)
        # the same program, the same name: hypothesis tells failures apart by place
        filename = f"<fuzz-program-{hashlib.sha1(source.encode()).hexdigest()[:12]}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True),
                                     filename)
        namespace: dict = {}
        exec(compile(source, filename, "exec"), namespace)  # noqa: S102 -- our own source
        return namespace["fn"], namespace["make_inputs"]


#: Source rewrites of the float64 reference (generated programs spell casts only so).
_WIDEN = [("torch.float16", "torch.float64"), ("torch.bfloat16", "torch.float64"),
          ("torch.float32", "torch.float64"), (".half()", ".double()"),
          (".bfloat16()", ".double()"), (".float()", ".double()")]


def program_from_source(source: str) -> FuzzProgram:
    """A program from the text ``FuzzProgram.source`` printed (regression tests)."""
    return FuzzProgram(source.strip("\n") + "\n")


class Builder:
    """The pool while a program is drawn: values, inputs, steps, and the draws."""

    def __init__(self, draw, seed: int):
        self.draw = draw
        self.values: list[Value] = []
        self.inputs: list[tuple[str, str]] = []       # (name, source expression)
        self.steps: list[tuple[str, str]] = []        # (targets, source expression)
        self.ops: list[str] = []                      # generator names, for statistics
        self.read: set[str] = set()
        self.seed = seed
        self.namespace = {"torch": torch, "F": F, "g": torch.Generator().manual_seed(seed)}
        self.counter = count()

    # ------------------------------------------------------------ draws
    def integer(self, low: int, high: int) -> int:
        return self.draw(st.integers(low, high))

    def choice(self, options):
        options = list(options)
        return options[self.draw(st.integers(0, len(options) - 1))]

    def flag(self) -> bool:
        return self.draw(st.booleans())

    def pick(self, predicate=lambda value: True) -> Value | None:
        """A pool value that satisfies ``predicate``, most recent first."""
        found = [value for value in reversed(self.values) if predicate(value)]
        return self.choice(found) if found else None

    def shape(self, max_rank: int = 4, max_size: int = 5, min_rank: int = 0) -> tuple[int, ...]:
        rank = self.integer(min_rank, max_rank)
        sizes = tuple(self.integer(1, max_size) for _ in range(rank))
        return sizes if math.prod(sizes) <= MAX_NUMEL else sizes[:2]

    # ------------------------------------------------------------ pool
    def new_input(self, shape, dtype: torch.dtype, low: int = -3, high: int = 4,
                  requires_grad: bool | None = None, text: str | None = None) -> Value:
        """A fresh input: floats from randn (with requires_grad drawn unless
        given), integers from randint(low, high), booleans from rand < 0.5
        (or from ``text``, an expression that may use the generator ``g``)."""
        shape = tuple(shape)
        if text is not None:
            name, source = f"{'m' if dtype == torch.bool else 'i'}{next(self.counter)}", text
        elif dtype in FLOATS:
            created, view = self._layout(shape)
            if dtype == torch.float32:
                text = f"torch.randn({created}, generator=g)"
            else:
                text = f"torch.randn({created}, generator=g, dtype=torch.float64)"
                text += "" if dtype == torch.float64 else f".to({dtype_name(dtype)})"
            text += view
            wants = self.integer(0, 4) > 0 if requires_grad is None else requires_grad
            name = f"x{next(self.counter)}"
            source = text + (".requires_grad_()" if wants else "")
        elif dtype == torch.bool:
            name, text = f"m{next(self.counter)}", f"torch.rand({shape}, generator=g) < 0.5"
            source = text
        else:
            name = f"i{next(self.counter)}"
            text = f"torch.randint({low}, {high}, {shape}, generator=g)"
            text += "" if dtype == torch.int64 else f".to({dtype_name(dtype)})"
            source = text
        value = Value(name, eval(text, self.namespace), exact=True,
                      grad=source.endswith(".requires_grad_()"), input=True)
        self.namespace[name] = value.tensor
        self.inputs.append((name, source))
        self.values.append(value)
        return value

    def _layout(self, shape: tuple) -> tuple[tuple, str]:
        """(shape to draw, view of it): most inputs are contiguous, some are
        transposed, strided or offset views, so kernels meet odd strides."""
        form = self.integer(0, 5) if shape else 0
        if form == 3 and len(shape) >= 2:
            return shape[:-2] + (shape[-1], shape[-2]), ".mT"
        if form == 4:
            return (2 * shape[0],) + shape[1:], "[::2]"
        if form == 5:
            return (shape[0] + 1,) + shape[1:], "[1:]"
        return shape, ""

    def add(self, expression: str, reads: list[Value], exact: bool = False,
            outputs: int = 1) -> list[Value] | None:
        """Evaluate ``expression`` eagerly; keep it as a step if eager takes it
        and its results are usable, else leave it out (None)."""
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = eval(expression, self.namespace)
        except (RuntimeError, IndexError, ValueError, TypeError):
            return None
        results = list(result) if outputs > 1 else [result]
        if not all(isinstance(r, torch.Tensor) and _usable(r) for r in results):
            return None
        names = [f"v{next(self.counter)}" for _ in results]
        self.steps.append((", ".join(names), expression))
        self.read |= {value.name for value in reads}
        grad = any(value.grad for value in reads)
        made = [Value(name, tensor, exact, grad and tensor.dtype in FLOATS)
                for name, tensor in zip(names, results)]
        for value in made:
            self.namespace[value.name] = value.tensor
        self.values.extend(made)
        return made

    # ------------------------------------------------------------ result
    def finish(self) -> FuzzProgram:
        step_names = [name for targets, _ in self.steps for name in targets.split(", ")]
        outputs = [name for name in step_names if name not in self.read] or step_names[-1:]
        arguments = ", ".join(name for name, _ in self.inputs)
        lines = ["import torch", "import torch.nn.functional as F", "", "",
                 f"def fn({arguments}):"]
        lines += [f"    {targets} = {expression}" for targets, expression in self.steps]
        lines += [f"    return {', '.join(outputs)},", "", "", "def make_inputs():",
                  f"    g = torch.Generator().manual_seed({self.seed})"]
        lines += [f"    {name} = {source}" for name, source in self.inputs]
        lines += [f"    return [{arguments}]"]
        return FuzzProgram("\n".join(lines) + "\n", list(self.ops))


def _usable(tensor: torch.Tensor) -> bool:
    if tensor.numel() == 0 or tensor.numel() > MAX_NUMEL or tensor.is_complex():
        return False
    if tensor.dtype in FLOATS:
        wide = tensor.double()
        return bool(wide.isfinite().all()) and wide.abs().max().item() <= MAX_MAGNITUDE
    if tensor.dtype != torch.bool:
        return tensor.abs().max().item() <= 1e6
    return True


def stable(value: Value, *branch_points) -> bool:
    """Both runs take the same branch at ``branch_points`` (tensors or numbers
    broadcast against ``value``): the value is exact, or every element is
    farther from each point than float rounding can move it."""
    if value.exact or not value.is_float:
        return True
    tensor = value.tensor.double()
    margin = _MARGIN[value.dtype]
    for point in branch_points:
        point = point.double() if isinstance(point, torch.Tensor) else point
        distance = (tensor - point).abs()
        size = torch.maximum(tensor.abs(), torch.as_tensor(point).abs()) + 1
        if bool((distance <= margin * size).any()):
            return False
    return True


def default_generators() -> list:
    """Every op generator, the simplest first (hypothesis shrinks towards the
    start of the list), the common ones repeated for weight."""
    import fuzz_extra
    import fuzz_ops as o
    import fuzz_shapes as s
    return [o.unary, o.binary, o.scalar, o.reduction, s.view, o.unary, o.binary, o.reduction,
            s.view, o.where, o.clamp, o.compare, o.cast, s.index, o.reduction, s.view, s.index,
            s.attention, s.cat, fuzz_extra.scatter, fuzz_extra.normalize, fuzz_extra.matmul,
            fuzz_extra.mutate]


@st.composite
def programs(draw, max_ops: int = 6, generators=None) -> FuzzProgram:
    """A random program of 1..``max_ops`` ops drawn from ``generators``
    (default: ``default_generators()``)."""
    import fuzz_ops
    generators = generators or default_generators()
    builder = Builder(draw, draw(st.integers(0, 2**16)))
    for _ in range(draw(st.integers(1, 2))):
        fuzz_ops.float_input(builder)
    for _ in range(draw(st.integers(1, max_ops))):
        generator = draw(st.sampled_from(generators))
        if generator(builder):
            builder.ops.append(generator.__name__)
    assume(builder.steps)
    return builder.finish()
