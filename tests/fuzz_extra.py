"""Op generators of the differential fuzzer beyond the issue's list, for the
code paths around it: scatters and in-place updates of intermediates
(functionalization, scatter kernels with repeated indices) and of inputs
that do not require grad (written back after the call), normalizations
and losses (fused reductions with epilogues), and matrix products (extern
calls between generated kernels, reading views)."""

from __future__ import annotations

import torch
from fuzz_ops import float_value
from fuzz_programs import FLOATS, Builder, Value, stable

__all__ = ["matmul", "mutate", "normalize", "scatter"]


def _source(builder: Builder, shape, dtype) -> Value:
    found = builder.pick(lambda v: v.shape == tuple(shape) and v.dtype == dtype)
    return found or builder.new_input(tuple(shape), dtype)


def scatter(builder: Builder) -> bool:
    """index_add / scatter_add / index_put (accumulating, or at distinct
    positions) / masked_fill / an in-place add into a clone."""
    x = float_value(builder)
    shape, rank = x.shape, len(x.shape)
    if rank == 0:
        return False
    d = builder.integer(-rank, rank - 1)
    form = builder.choice(["index_add", "scatter_add", "index_put", "put_distinct",
                           "masked_fill", "add_"])
    if form == "index_add":
        count = builder.integer(1, 5)
        i = builder.new_input((count,), torch.int64, low=0, high=shape[d])
        src = _source(builder, shape[:d % rank] + (count,) + shape[d % rank + 1:], x.dtype)
        text, reads = f"torch.index_add({x.name}, {d}, {i.name}, {src.name})", [x, i, src]
    elif form == "scatter_add":
        sizes = tuple(builder.integer(1, s) for s in shape)
        i = builder.new_input(sizes, torch.int64, low=0, high=shape[d])
        src = _source(builder, sizes, x.dtype)
        text, reads = f"torch.scatter_add({x.name}, {d}, {i.name}, {src.name})", [x, i, src]
    elif form == "index_put":
        i = builder.new_input((builder.integer(1, 5),), torch.int64, low=-shape[0], high=shape[0])
        src = _source(builder, i.shape + shape[1:], x.dtype)
        text = f"{x.name}.index_put(({i.name},), {src.name}, accumulate=True)"
        reads = [x, i, src]
    elif form == "put_distinct":   # distinct rows: no write order to depend on
        count = builder.integer(1, shape[0])
        text = f"torch.randperm({shape[0]}, generator=g)[:{count}]"
        i = builder.new_input((count,), torch.int64, text=text)
        src = _source(builder, (count,) + shape[1:], x.dtype)
        text, reads = f"{x.name}.index_put(({i.name},), {src.name})", [x, i, src]
    elif form == "masked_fill":
        m = builder.new_input(shape[rank - builder.integer(0, rank):], torch.bool)
        text, reads = f"{x.name}.masked_fill({m.name}, {builder.choice([0.0, -1.5])})", [x, m]
    else:
        text, reads = f"{x.name}.clone().add_({x.name}.flip({d}), alpha=0.5)", [x]
    return bool(builder.add(text, reads))


def normalize(builder: Builder) -> bool:
    """layer_norm / rms_norm over trailing dims (affine or not), cross_entropy."""
    x = float_value(builder)
    shape, rank = x.shape, len(x.shape)
    if rank == 0:
        return False
    form = builder.choice(["layer_norm", "rms_norm", "cross_entropy"])
    if form == "cross_entropy":
        if rank != 2:
            return False
        target = builder.new_input(shape[:1], torch.int64, low=0, high=shape[1])
        smoothing = f", label_smoothing={builder.choice([0.1, 0.3])}" if builder.flag() else ""
        return bool(builder.add(f"F.cross_entropy({x.name}, {target.name}{smoothing})",
                                [x, target]))
    normalized = shape[rank - builder.integer(1, min(rank, 2)):]
    reads, extra = [x], ""
    if builder.flag():
        weight = builder.new_input(normalized, x.dtype if x.dtype in FLOATS else torch.float32)
        reads, extra = reads + [weight], f", {weight.name}"
        if form == "layer_norm" and builder.flag():
            bias = builder.new_input(normalized, weight.dtype)
            reads, extra = reads + [bias], extra + f", {bias.name}"
    return bool(builder.add(f"F.{form}({x.name}, {normalized}{extra})", reads))


def matmul(builder: Builder) -> bool:
    """``x @ w`` with ``w`` a pool value or a fresh input of matching inner size."""
    x = float_value(builder)
    if not x.shape:
        return False
    inner = x.shape[-1]
    w = builder.pick(lambda v: v.dtype == x.dtype and len(v.shape) == 2 and v.shape[0] == inner)
    w = w or builder.new_input((inner, builder.integer(1, 6)), x.dtype)
    return bool(builder.add(f"{x.name} @ {w.name}", [x, w]))


def mutate(builder: Builder) -> bool:
    """An in-place op on a pool value or on a view of it: an input that does not
    require grad (the compiled call must write it back) or an intermediate."""
    # An input read before it is written is included: the backward must read
    # it as it was (tests/test_fuzz.py::test_saved_input_mutated_later).
    x = builder.pick(lambda v: v.dtype != torch.bool and not (v.input and v.grad))
    if x is None or not x.shape:
        return False
    rank = len(x.shape)
    d = builder.integer(-rank, rank - 1)
    target = builder.choice([x.name, f"{x.name}[1:]", f"{x.name}.select({d}, 0)",
                             f"{x.name}.transpose(0, {d})"])
    s = builder.choice([2, -1, 3]) if not x.is_float else builder.choice([0.5, -1.5, 2])
    change = builder.choice([f"add_({s})", f"mul_({s})", f"clamp_(min={s})", f"fill_({s})"])
    if change.startswith("clamp_") and not stable(x, s):
        return False
    return bool(builder.add(f"{target}.{change}", [x]))
