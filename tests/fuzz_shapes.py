"""Op generators of the differential fuzzer that move data rather than compute
it: views, indexing (gather, index_select, advanced indexing, embedding),
concatenation, and scaled dot-product attention. Views and indexing keep a
value exact (they copy elements); see tests/fuzz_programs.py."""

from __future__ import annotations

import torch
from fuzz_ops import float_input, partner
from fuzz_programs import FLOATS, Builder, Value

__all__ = ["attention", "cat", "index", "view"]


def _any(builder: Builder) -> Value:
    return builder.pick() or float_input(builder)


def _factor(builder: Builder, numel: int) -> tuple[int, ...]:
    """A random shape with ``numel`` elements (size-1 dims included)."""
    factors, n, p = [], numel, 2
    while n > 1:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    sizes = [1] * builder.integer(1, 4)
    for f in factors:
        sizes[builder.integer(0, len(sizes) - 1)] *= f
    return tuple(sizes)


def _slices(builder: Builder, shape) -> str:
    parts = []
    for size in shape:
        start, step = builder.integer(0, max(size - 1, 0)), builder.integer(1, 3)
        parts.append(builder.choice([":", f"{start}::{step}", f"::{step}", f"{start}:",
                                     f":{max(size - start, 1)}"]))
    while parts and parts[-1] == ":":
        parts.pop()
    return ", ".join(parts) or "..."


def view(builder: Builder) -> bool:
    x = _any(builder)
    shape, rank = x.shape, len(x.shape)
    forms = ["reshape", "unsqueeze", "slice", "expand", "flatten"]
    if rank >= 1:
        forms += ["select", "narrow", "unfold", "squeeze"]
    if rank >= 2:
        forms += ["permute", "transpose", "mT", "diagonal", "movedim"]
    form = builder.choice(forms)
    d = builder.integer(-rank, rank - 1) if rank else 0
    if form == "reshape":
        target = _factor(builder, x.tensor.numel())
        if builder.flag():
            target = tuple(-1 if i == 0 else s for i, s in enumerate(target))
        text = f"{x.name}.reshape({target})"
    elif form == "unsqueeze":
        text = f"{x.name}.unsqueeze({builder.integer(-rank - 1, rank)})"
    elif form == "slice":
        text = f"{x.name}[{_slices(builder, shape)}]"
    elif form == "expand":
        sizes = [builder.integer(2, 3) if s == 1 and builder.flag() else s for s in shape]
        sizes = [builder.integer(1, 3)] * builder.integer(0, 1) + sizes
        text = f"{x.name}.expand({tuple(sizes)})"
    elif form == "flatten":
        text = f"{x.name}.flatten()" if rank < 2 else f"{x.name}.flatten({min(d % rank, 1)})"
    elif form == "select":
        text = f"{x.name}.select({d}, {builder.integer(-shape[d], shape[d] - 1)})"
    elif form == "narrow":
        start = builder.integer(0, shape[d] - 1)
        text = f"{x.name}.narrow({d}, {start}, {builder.integer(1, shape[d] - start)})"
    elif form == "unfold":
        size = builder.integer(1, shape[d])
        text = f"{x.name}.unfold({d}, {size}, {builder.integer(1, 2)})"
    elif form == "squeeze":
        ones = [i for i, s in enumerate(shape) if s == 1]
        text = f"{x.name}.squeeze({builder.choice(ones)})" if ones else f"{x.name}.squeeze()"
    elif form == "permute":
        order = list(range(rank))
        for i in range(rank - 1, 0, -1):
            j = builder.integer(0, i)
            order[i], order[j] = order[j], order[i]
        text = f"{x.name}.permute({tuple(order)})"
    elif form == "transpose":
        text = f"{x.name}.transpose({d}, {builder.integer(-rank, rank - 1)})"
    elif form == "mT":
        text = f"{x.name}.mT"
    elif form == "diagonal":
        text = f"{x.name}.diagonal({builder.integer(-1, 1)}, {d}, {(d + 1) % rank})"
    else:
        text = f"{x.name}.movedim({d}, {builder.integer(-rank, rank - 1)})"
    if builder.integer(0, 4) == 0:
        text += ".contiguous()"
    return bool(builder.add(text, [x], x.exact))


def _indices(builder: Builder, shape, high: int, negative: bool = False) -> Value:
    return builder.new_input(shape, torch.int64, low=-high if negative else 0, high=high)


def index(builder: Builder) -> bool:
    x = _any(builder)
    shape, rank = x.shape, len(x.shape)
    if rank == 0:
        return False
    d = builder.integer(-rank, rank - 1)
    form = builder.choice(["gather", "index_select", "advanced", "embedding", "two", "argmax"])
    if form == "gather" or (form == "argmax" and not x.is_float):
        sizes = tuple(builder.integer(1, s) if i != d % rank else builder.integer(1, 4)
                      for i, s in enumerate(shape))
        i = _indices(builder, sizes, shape[d])
        return bool(builder.add(f"torch.gather({x.name}, {d}, {i.name})", [x, i], x.exact))
    if form == "argmax":   # indices computed in the program: the common max-pick pattern
        if not x.exact:
            return False
        return bool(builder.add(f"torch.gather({x.name}, {d}, {x.name}.argmax({d}, keepdim=True))",
                                [x], x.exact))
    if form == "index_select":
        i = _indices(builder, (builder.integer(1, 5),), shape[d])
        return bool(builder.add(f"torch.index_select({x.name}, {d}, {i.name})", [x, i], x.exact))
    if form == "embedding":
        if rank != 2 or not x.is_float:
            return False
        i = _indices(builder, builder.shape(max_rank=2, max_size=4, min_rank=1), shape[0])
        padding = f", padding_idx={builder.integer(0, shape[0] - 1)}" if builder.flag() else ""
        return bool(builder.add(f"F.embedding({i.name}, {x.name}{padding})", [x, i], x.exact))
    if form == "two" and rank >= 2:
        i = _indices(builder, builder.shape(max_rank=2, max_size=3, min_rank=1), shape[0],
                     negative=True)
        j = _indices(builder, i.shape[len(i.shape) - builder.integer(1, len(i.shape)):],
                     shape[1], negative=True)
        return bool(builder.add(f"{x.name}[{i.name}, {j.name}]", [x, i, j], x.exact))
    i = _indices(builder, builder.shape(max_rank=2, max_size=4, min_rank=1), shape[d],
                 negative=True)
    prefix = ":, " * (d % rank) if builder.flag() or d % rank == 0 else "..., "
    if prefix == "..., ":
        i = _indices(builder, i.shape, shape[-1], negative=True)
    return bool(builder.add(f"{x.name}[{prefix}{i.name}]", [x, i], x.exact))


def cat(builder: Builder) -> bool:
    x = _any(builder)
    rank = len(x.shape)
    if rank == 0:
        return False
    d = builder.integer(-rank, rank - 1)
    sizes = list(x.shape)
    sizes[d] = builder.integer(1, 3)
    other = builder.pick(lambda v: v is not x and v.shape == tuple(sizes))
    other = other or builder.new_input(tuple(sizes), builder.choice([x.dtype, torch.float32]))
    function = builder.choice(["cat", "stack"]) if other.shape == x.shape else "cat"
    return bool(builder.add(f"torch.{function}([{x.name}, {other.name}], {d})", [x, other],
                            x.exact and other.exact))


def _attention_inputs(builder: Builder):
    """q (a pool value of rank 3 or 4 when there is one, else fresh), k and v
    with matching batch dims and dtype."""
    q = builder.pick(lambda v: v.is_float and len(v.shape) in (3, 4)) if builder.flag() else None
    if q is None:
        batch = tuple(builder.integer(1, 2) for _ in range(builder.integer(1, 2)))
        shape = batch + (builder.integer(1, 6), builder.integer(1, 8))
        q = builder.new_input(shape, builder.choice([torch.float32] * 3 + list(FLOATS[1:])))
    *batch, _, features = q.shape
    length = builder.integer(1, 6)
    k = builder.new_input(tuple(batch) + (length, features), q.dtype)
    v = builder.new_input(tuple(batch) + (length, builder.integer(1, 8)), q.dtype)
    return q, k, v


def attention(builder: Builder) -> bool:
    q, k, v = _attention_inputs(builder)
    queries, keys = q.shape[-2], k.shape[-2]
    form = builder.choice(["none", "causal", "bool", "float"])
    extra, reads = "", [q, k, v]
    if form == "causal":
        extra = ", is_causal=True"
    elif form == "bool":   # column 0 always kept: a fully masked row is NaN in eager
        text = (f"(torch.rand({(queries, keys)}, generator=g) < 0.6) "
                f"| (torch.arange({keys}) == 0)")
        mask = builder.new_input((queries, keys), torch.bool, text=text)
        extra, reads = f", attn_mask={mask.name}", reads + [mask]
    elif form == "float":
        mask = partner(builder, Value("", torch.empty(q.shape[:-1] + (keys,))), dtypes=[q.dtype])
        extra, reads = f", attn_mask={mask.name}", reads + [mask]
    if builder.flag():
        extra += f", scale={builder.choice([0.3, 1.0, 2.0])}"
    return bool(builder.add(f"F.scaled_dot_product_attention({q.name}, {k.name}, {v.name}{extra})",
                            reads))
