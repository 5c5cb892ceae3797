"""Op generators of the differential fuzzer: pointwise ops, casts and reductions.

Each generator takes the ``Builder`` (tests/fuzz_programs.py), draws an op and
its operands, and returns whether it added a step. Views, indexing and
attention are in tests/fuzz_shapes.py, scatters, norms and matmul in
tests/fuzz_extra.py; ``fuzz_programs.default_generators()`` lists them all.
"""

from __future__ import annotations

import math

import torch
from fuzz_programs import FLOATS, MAX_NUMEL, Builder, Value, dtype_name, stable

__all__ = [
    "binary",
    "cast",
    "clamp",
    "compare",
    "float_input",
    "float_value",
    "partner",
    "reduction",
    "scalar",
    "unary",
    "where",
]

_FLOAT_DTYPES = [torch.float32] * 4 + [torch.float64, torch.bfloat16, torch.float16]
_SCALARS = [2, 0.5, -1.5, 3, -2, 0.25]

#: (template, largest |x| it is drawn for); the results of all of them are inexact.
_UNARY = [
    ("torch.sin({x})", None), ("torch.exp({x})", 8), ("torch.tanh({x})", None),
    ("torch.sigmoid({x})", None), ("torch.log({x}.abs() + 1)", None),
    ("torch.sqrt({x}.abs() + 0.1)", None), ("torch.rsqrt({x}.abs() + 0.5)", None),
    ("torch.reciprocal({x}.abs() + 0.5)", None), ("F.gelu({x})", None),
    ("F.gelu({x}, approximate='tanh')", None), ("F.silu({x})", None), ("torch.erf({x})", None),
    ("F.softplus({x})", None), ("torch.square({x})", 100), ("{x} ** 3", 20),
    ("F.leaky_relu({x}, 0.1)", None), ("F.elu({x})", None), ("torch.expm1({x})", 8),
    ("F.logsigmoid({x})", None), ("torch.cos({x})", None), ("torch.log1p({x}.abs())", None),
    ("torch.exp2({x})", 8), ("torch.atan({x})", None), ("torch.nan_to_num({x})", None),
]
#: (template, branch points as a function of the value); results exact for exact x.
_EXACT_UNARY = [
    ("-{x}", None), ("torch.abs({x})", None), ("torch.relu({x})", None),
    ("torch.floor({x})", lambda t: t.round()), ("torch.ceil({x})", lambda t: t.round()),
    ("torch.trunc({x})", lambda t: t.round()), ("torch.round({x})", lambda t: t.floor() + 0.5),
    ("torch.sign({x})", lambda t: 0),
]
_INTEGER_UNARY = ["-{x}", "torch.abs({x})", "{x} * 3", "{x} // 2", "{x} % 3", "{x} + 1"]


def float_input(builder: Builder) -> Value:
    return builder.new_input(builder.shape(), builder.choice(_FLOAT_DTYPES))


def float_value(builder: Builder) -> Value:
    """A floating pool value, or a fresh float input when there is none."""
    return builder.pick(lambda value: value.is_float) or float_input(builder)


def _numeric(builder: Builder) -> Value:
    return builder.pick(lambda value: value.dtype != torch.bool) or float_input(builder)


def partner(builder: Builder, value: Value, dtypes=None) -> Value:
    """A pool value that broadcasts with ``value``, or a fresh input shaped to
    (a suffix of its shape with some sizes 1, or one more leading dim)."""
    def fits(other: Value) -> bool:
        return (other is not value and other.dtype != torch.bool
                and (dtypes is None or other.dtype in dtypes) and _broadcasts(value, other))
    if builder.flag():
        found = builder.pick(fits)
        if found is not None:
            return found
    rank = len(value.shape)
    suffix = value.shape[rank - builder.integer(0, rank):]
    sizes = [size if builder.flag() else 1 for size in suffix]
    sizes = [builder.integer(2, 3) if value.shape[rank - len(sizes) + i] == 1 and size == 1
             and builder.flag() else size for i, size in enumerate(sizes)]
    if len(sizes) == rank and builder.integer(0, 3) == 0:   # one more leading dim
        sizes = [builder.integer(1, 3)] + sizes
    dtype = builder.choice(dtypes or _FLOAT_DTYPES + [torch.int64])
    return builder.new_input(tuple(sizes), dtype)


# ---------------------------------------------------------------- pointwise
def unary(builder: Builder) -> bool:
    x = _numeric(builder)
    if not x.is_float:
        return bool(builder.add(builder.choice(_INTEGER_UNARY).format(x=x.name), [x], True))
    if builder.flag():
        template, bound = builder.choice(_UNARY)
        if bound is not None and x.tensor.double().abs().max().item() > bound:
            return False
        return bool(builder.add(template.format(x=x.name), [x]))
    template, points = builder.choice(_EXACT_UNARY)
    if points is not None and not stable(x, points(x.tensor.double())):
        return False
    return bool(builder.add(template.format(x=x.name), [x], x.exact))


def binary(builder: Builder) -> bool:
    a = _numeric(builder)
    b = partner(builder, a)
    template = builder.choice(["{a} + {b}", "{a} - {b}", "{a} * {b}", "{a} / ({b}.abs() + 0.5)",
                               "torch.maximum({a}, {b})", "torch.minimum({a}, {b})",
                               "torch.add({a}, {b}, alpha=2)", "torch.pow({a}.abs() + 0.5, {b})"])
    if builder.flag():
        a, b = b, a
    exact = "maximum" in template or "minimum" in template
    if exact and not (stable(a, b.tensor) or (a.exact and b.exact)):
        return False
    return bool(builder.add(template.format(a=a.name, b=b.name), [a, b],
                            exact and a.exact and b.exact))


def scalar(builder: Builder) -> bool:
    x = _numeric(builder)
    s = builder.choice(_SCALARS)
    template = builder.choice(["{x} + {s}", "{s} - {x}", "{x} * {s}", "{x} / {s}", "{x} ** 2",
                               "torch.mul({x}, {s})", "{s} / ({x}.abs() + 1)"])
    return bool(builder.add(template.format(x=x.name, s=s), [x]))


def where(builder: Builder) -> bool:
    a = _numeric(builder)
    c = builder.pick(lambda value: value.dtype == torch.bool and _broadcasts(value, a))
    if c is None:
        probe = float_value(builder)
        threshold = builder.choice([0.0, 0.5, -0.5])
        if not stable(probe, threshold) or not _broadcasts(probe, a):
            return False
        condition, reads = f"{probe.name} > {threshold}", [probe]
    else:
        condition, reads = c.name, [c]
    if builder.flag():
        return bool(builder.add(f"torch.where({condition}, {a.name}, {builder.choice(_SCALARS)})",
                                reads + [a], a.exact))
    b = partner(builder, a)
    return bool(builder.add(f"torch.where({condition}, {a.name}, {b.name})", reads + [a, b],
                            a.exact and b.exact))


def _broadcasts(x: Value, y: Value) -> bool:
    try:
        return math.prod(torch.broadcast_shapes(x.shape, y.shape)) <= MAX_NUMEL
    except RuntimeError:
        return False


def clamp(builder: Builder) -> bool:
    x = _numeric(builder)
    low, high = builder.choice([(-1, 1), (-0.5, 2), (0, 0.5)])
    form = builder.integer(0, 3)
    if form == 3:
        bound = partner(builder, x, dtypes=[x.dtype])
        if not (stable(x, bound.tensor) or (x.exact and bound.exact)):
            return False
        return bool(builder.add(f"torch.clamp({x.name}, min={bound.name})", [x, bound],
                                x.exact and bound.exact))
    if not stable(x, low, high):
        return False
    template = ["torch.clamp({x}, min={lo}, max={hi})", "{x}.clamp(min={lo})",
                "{x}.clamp(max={hi})"][form]
    return bool(builder.add(template.format(x=x.name, lo=low, hi=high), [x], x.exact))


def compare(builder: Builder) -> bool:
    flags = builder.pick(lambda value: value.dtype == torch.bool)
    if flags is not None and builder.flag():
        other = builder.pick(lambda value: value.dtype == torch.bool and _broadcasts(value, flags))
        template = builder.choice(["~{a}", "{a} & {b}", "{a} | {b}", "torch.logical_xor({a}, {b})"])
        return bool(builder.add(template.format(a=flags.name, b=other.name), [flags, other], True))
    a = _numeric(builder)
    operator = builder.choice([">", "<=", "<", ">=", "==", "!="])
    if builder.flag():
        s = builder.choice([0.0, 0.5, -1, 1])
        if not stable(a, s):
            return False
        return bool(builder.add(f"{a.name} {operator} {s}", [a], True))
    b = partner(builder, a)
    if not (stable(a, b.tensor) or (a.exact and b.exact)):
        return False
    return bool(builder.add(f"{a.name} {operator} {b.name}", [a, b], True))


def cast(builder: Builder) -> bool:
    x = builder.pick() or float_input(builder)
    target = builder.choice([torch.float64, torch.float32, torch.bfloat16, torch.float16,
                             torch.int64, torch.bool, torch.int32])
    if x.is_float and target not in FLOATS:
        points = (lambda t: 0) if target == torch.bool else (lambda t: t.round())
        if not stable(x, points(x.tensor.double())):
            return False
    widening = {torch.float64: FLOATS + (torch.int32, torch.bool),
                torch.float32: (torch.bfloat16, torch.float16, torch.float32, torch.int32,
                                torch.bool),
                torch.int64: (torch.int32, torch.int64, torch.bool)}
    exact = target not in FLOATS or x.dtype in widening.get(target, ())
    text = builder.choice([f"{x.name}.to({dtype_name(target)})",
                           {torch.float32: f"{x.name}.float()", torch.float64: f"{x.name}.double()",
                            torch.bfloat16: f"{x.name}.bfloat16()",
                            torch.float16: f"{x.name}.half()",
                            torch.int64: f"{x.name}.long()", torch.bool: f"{x.name}.bool()",
                            torch.int32: f"{x.name}.int()"}[target]])
    return bool(builder.add(text, [x], exact and x.exact))


# ---------------------------------------------------------------- reductions
def _dims(builder: Builder, rank: int, single: bool = False):
    """None (all dims), one dim (maybe negative), or a tuple of distinct dims."""
    if rank == 0:
        return builder.choice([0, -1])
    mode = 1 if single else builder.integer(0, 2)
    if mode == 0:
        return None
    if mode == 1:
        return builder.integer(-rank, rank - 1)
    chosen = sorted({builder.integer(0, rank - 1) for _ in range(builder.integer(1, rank))})
    return tuple(d - rank if builder.flag() else d for d in chosen)


def _no_ties(x: Value, dim) -> bool:
    """Both runs pick the same extreme along ``dim``: exact values, or a gap
    between the two largest and the two smallest elements of every slice."""
    if x.exact or not x.is_float or x.tensor.dim() == 0:
        return True
    tensor = x.tensor.double()
    dims = range(tensor.dim()) if dim is None else [dim] if isinstance(dim, int) else list(dim)
    dims = sorted(d % tensor.dim() for d in dims)
    rest = [d for d in range(tensor.dim()) if d not in dims]
    extent = math.prod(tensor.shape[d] for d in dims)
    rows = tensor.permute(rest + dims).reshape(-1 if rest else 1, extent)
    if rows.shape[1] < 2:
        return True
    ordered = rows.sort(dim=1).values
    scale = tensor.abs().max().item() + 1
    gaps = torch.cat([ordered[:, -1] - ordered[:, -2], ordered[:, 1] - ordered[:, 0]])
    margin = {torch.float64: 1e-9, torch.float32: 1e-4}.get(x.dtype, 6e-2)
    return bool((gaps > margin * scale).all())


def reduction(builder: Builder) -> bool:
    x = _numeric(builder)
    rank, keep = x.tensor.dim(), builder.flag()
    kind = builder.choice(["sum", "mean", "amax", "softmax", "log_softmax", "logsumexp", "var",
                           "std", "amin", "max", "argmax", "prod", "min", "argmin"])
    single = kind in ("softmax", "log_softmax", "max", "min")
    dim = _dims(builder, rank, single=single)
    if kind in ("amax", "amin", "max", "min", "argmax", "argmin") and not _no_ties(x, dim):
        return False
    name, dims = x.name, ("" if dim is None else f"{dim}, ")
    if kind in ("softmax", "log_softmax"):
        cast = ", dtype=torch.float32" if x.dtype != torch.float32 and builder.flag() else ""
        source = f"torch.{kind}({name}, {dim}{cast})"
    elif kind in ("max", "min"):
        return bool(builder.add(f"torch.{kind}({name}, {dim}, keepdim={keep})", [x], x.exact, 2))
    elif kind in ("argmax", "argmin"):
        dim = dim if not isinstance(dim, tuple) else dim[0]
        source = f"torch.{kind}({name}, {dim}, keepdim={keep})" if dim is not None else \
            f"torch.{kind}({name})"
    elif kind in ("var", "std"):
        source = f"torch.{kind}({name}, {dims}correction={builder.integer(0, 1)}, keepdim={keep})"
    elif kind == "logsumexp":
        dims = dim if dim is not None else tuple(range(rank))
        source = f"torch.logsumexp({name}, {dims}, {keep})"
    elif kind == "prod":
        dim = dim if not isinstance(dim, tuple) else dim[0]
        source = f"torch.prod({name}, {dim}, keepdim={keep})" if dim is not None else \
            f"torch.prod({name})"
    elif dim is None:
        source = f"{name}.{kind}()"
    else:
        source = f"{name}.{kind}({dim}, keepdim={keep})"
    return bool(builder.add(source, [x], kind in ("amax", "amin") and x.exact))
