"""Ops that read through computed indices, as pointwise lowerings.

Each of these computes one output element from one (or, for ``cat``, one
of several) input elements whose position depends on the output coordinate
or on an index tensor: embedding, gather, index_select, cat, constant
padding, slice_scatter and select_scatter. They fit the pointwise kernel:
the output is an ordinary in-kernel value, fusable with what consumes it;
only the inputs must be read from memory (fusion keeps them out of the
kernel, see ``reads_by_index``).

Like Inductor's indirect indexing, nothing checks that an index is in
range: an out-of-range index reads out of bounds instead of raising.
"""

from __future__ import annotations

import torch
from retrograd.codegen import ops

__all__ = ["INDEXING", "index_layout", "lower_indexing", "reads_by_index"]

aten = torch.ops.aten


def _shape(node) -> tuple[int, ...]:
    return tuple(node.meta["val"].shape)


def _join(writer, terms: list[str]) -> str:
    """The sum of index terms; with none (a 0-dim or all-ones source), a block
    of zeros, since the interpreter refuses a block mask on a scalar pointer."""
    if terms:
        return " + ".join(terms)
    writer.needs_broadcast = True
    return "broadcast"


def _source_index(writer, source, out_shape, coordinates: dict[int, str]) -> str:
    """Flat index into ``source`` (a node) at output coordinates, with some
    dimensions replaced by expressions (``coordinates``: source dim -> text).
    A constant fill has no buffer: its literal is used instead (see ``_load``)."""
    if ops.is_fill(source):
        return "0"
    buffer = writer.buffers[source.name]
    terms = []
    lead = len(out_shape) - len(buffer.shape)
    for dim, (size, stride) in enumerate(zip(buffer.shape, buffer.strides)):
        if dim in coordinates:
            coordinate = coordinates[dim]
        elif size == 1 or stride == 0:
            continue
        else:
            coordinate = writer.coordinate(out_shape, dim + lead)
        terms.append(coordinate if stride == 1 else f"({coordinate}) * {stride}")
    return _join(writer, terms)


def _load(writer, source, index: str, out_dtype, valid: str | None = None) -> str:
    if ops.is_fill(source):
        return ops.literal(ops.fill_value(source))
    return writer.indexed_load(source.name, index, valid, ops.compute_dtype(out_dtype))


def _embedding(node, writer) -> str:
    weight, indices = node.args[:2]
    out = _shape(node)
    ids = writer.buffers[indices.name]
    terms = [f"{writer.coordinate(out, d)} * {s}" if s != 1 else writer.coordinate(out, d)
             for d, (size, s) in enumerate(zip(ids.shape, ids.strides)) if size > 1 and s]
    row = writer.indexed_load(indices.name, _join(writer, terms), None, None)
    index = _source_index(writer, weight, out, {0: row})
    return _load(writer, weight, index, node.meta["val"].dtype)


def _gather(node, writer) -> str:
    source, dim, index = node.args[:3]
    dim %= max(1, source.meta["val"].dim())
    chosen = writer.operand(node, index)
    return _load(writer, source, _source_index(writer, source, _shape(node), {dim: chosen}),
                 node.meta["val"].dtype)


def _index_select(node, writer) -> str:
    source, dim, index = node.args[:3]
    out = _shape(node)
    dim %= max(1, len(out))
    positions = writer.buffers[index.name]
    position = writer.coordinate(out, dim)
    stride = positions.strides[0] if positions.strides else 0
    chosen = writer.indexed_load(index.name, f"{position} * {stride}", None, None)
    return _load(writer, source, _source_index(writer, source, out, {dim: chosen}),
                 node.meta["val"].dtype)


def _cat(node, writer) -> str:
    tensors = [t for t in node.args[0] if t.meta["val"].numel() > 0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    out = _shape(node)
    dim %= len(out)
    position = writer.coordinate(out, dim)
    pieces, offset = [], 0
    for tensor in tensors:
        size = _shape(tensor)[dim]
        valid = f"({position} >= {offset}) & ({position} < {offset + size})"
        index = _source_index(writer, tensor, out, {dim: f"{position} - {offset}"})
        pieces.append((valid, _load(writer, tensor, index, node.meta["val"].dtype, valid)))
        offset += size
    expression = pieces[-1][1]
    for valid, value in reversed(pieces[:-1]):
        expression = f"tl.where({valid}, {value}, {expression})"
    return expression


def _constant_pad(node, writer) -> str:
    source, pad = node.args[:2]
    value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
    out, shape = _shape(node), _shape(source)
    coordinates, checks = {}, []
    for pair in range(len(pad) // 2):
        dim = len(out) - 1 - pair
        before = pad[2 * pair]
        coordinate = writer.coordinate(out, dim)
        shifted = f"{coordinate} - {before}" if before else coordinate
        coordinates[dim] = shifted
        checks.append(f"({shifted} >= 0) & ({shifted} < {shape[dim]})")
    valid = " & ".join(checks) or "1"
    loaded = _load(writer, source, _source_index(writer, source, out, coordinates),
                   node.meta["val"].dtype, valid)
    return f"tl.where({valid}, {loaded}, {ops.literal(value)})"


def _slice_scatter(node, writer) -> str:
    base, source = node.args[:2]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    out = _shape(node)
    dim %= len(out)
    start = node.args[3] if len(node.args) > 3 else node.kwargs.get("start")
    end = node.args[4] if len(node.args) > 4 else node.kwargs.get("end")
    step = node.args[5] if len(node.args) > 5 else node.kwargs.get("step", 1)
    start = 0 if start is None else start % out[dim] if start < 0 else min(start, out[dim])
    end = out[dim] if end is None else end % out[dim] if end < 0 else min(end, out[dim])
    position = writer.coordinate(out, dim)
    inside = f"({position} >= {start}) & ({position} < {end})"
    if step != 1:
        inside += f" & ((({position} - {start}) % {step}) == 0)"
    dtype = node.meta["val"].dtype
    index = _source_index(writer, source, out, {dim: f"({position} - {start}) // {step}"})
    written = _load(writer, source, index, dtype, inside)
    kept = writer.operand(node, base, ops.compute_dtype(dtype))
    return f"tl.where({inside}, {written}, {kept})"


def _select_scatter(node, writer) -> str:
    base, source, dim, position_value = node.args[:4]
    out = _shape(node)
    dim %= len(out)
    position_value %= out[dim]
    position = writer.coordinate(out, dim)
    inside = f"{position} == {position_value}"
    buffer = writer.buffers[source.name] if not ops.is_fill(source) else None
    if buffer is None:
        written = ops.literal(ops.fill_value(source))
    else:
        terms = []
        for source_dim, (size, stride) in enumerate(zip(buffer.shape, buffer.strides)):
            out_dim = source_dim if source_dim < dim else source_dim + 1
            if size > 1 and stride:
                coordinate = writer.coordinate(out, out_dim)
                terms.append(coordinate if stride == 1 else f"{coordinate} * {stride}")
        written = writer.indexed_load(source.name, _join(writer, terms), inside,
                                      ops.compute_dtype(node.meta["val"].dtype))
    kept = writer.operand(node, base, ops.compute_dtype(node.meta["val"].dtype))
    return f"tl.where({inside}, {written}, {kept})"


def _flip(node, writer) -> str:
    source, dims = node.args[:2]
    out = _shape(node)
    coordinates = {d % len(out): f"{out[d % len(out)] - 1} - {writer.coordinate(out, d % len(out))}"
                   for d in dims if out[d % len(out)] > 1}
    return _load(writer, source, _source_index(writer, source, out, coordinates),
                 node.meta["val"].dtype)


def index_layout(rank_in: int, index_shapes: list) -> tuple[list[int], int, int, dict]:
    """Where aten.index (and index_put) put things, for a source of rank
    ``rank_in`` and one shape or None per leading source dim: (indexed dims,
    first result dim of the broadcast index block, its rank, result dim of
    every other source dim). Adjacent index tensors put the block where they
    stand; index tensors separated by a full slice put it first, as NumPy does."""
    positions = [d for d, shape in enumerate(index_shapes) if shape is not None]
    rank = len(torch.broadcast_shapes(*(index_shapes[d] for d in positions)))
    rest = [d for d in range(rank_in) if d not in positions]
    if positions == list(range(positions[0], positions[-1] + 1)):
        first = positions[0]
        kept = {d: d if d < first else d - len(positions) + rank for d in rest}
    else:
        first = 0
        kept = {d: rank + position for position, d in enumerate(rest)}
    return positions, first, rank, kept


def _index_layout(node):
    indices = node.args[1]
    return index_layout(node.args[0].meta["val"].dim(),
                        [None if i is None else _shape(i) for i in indices])


def _index_value(writer, index, size: int, out, first: int, rank: int) -> str:
    """One index tensor's value at each output element, negatives wrapped."""
    if ops.is_fill(index):
        value = ops.fill_value(index)
        return str(value + size if value < 0 else value)
    buffer = writer.buffers[index.name]
    lead = first + rank - len(buffer.shape)
    terms = [writer.coordinate(out, d + lead) if s == 1 else
             f"{writer.coordinate(out, d + lead)} * {s}"
             for d, (n, s) in enumerate(zip(buffer.shape, buffer.strides)) if n > 1 and s]
    value = writer.indexed_load(index.name, _join(writer, terms), None, None)
    return f"tl.where({value} < 0, {value} + {size}, {value})"


def _index(node, writer) -> str:
    """``x[i, j]``, ``x[:, i]``, ``x[i, :, j]``: aten.index with index tensors."""
    source, indices = node.args[:2]
    shape, out = _shape(source), _shape(node)
    positions, first, rank, kept = _index_layout(node)
    coordinates = {d: _index_value(writer, indices[d], shape[d], out, first, rank)
                   for d in positions}
    coordinates.update({d: writer.coordinate(out, out_dim) for d, out_dim in kept.items()
                        if shape[d] > 1})
    return _load(writer, source, _source_index(writer, source, out, coordinates),
                 node.meta["val"].dtype)


INDEXING = {
    aten.embedding.default: _embedding,
    aten.gather.default: _gather,
    aten.index_select.default: _index_select,
    aten.cat.default: _cat,
    aten.constant_pad_nd.default: _constant_pad,
    aten.slice_scatter.default: _slice_scatter,
    aten.select_scatter.default: _select_scatter,
    aten.flip.default: _flip,
    aten.index.Tensor: _index,
}


def reads_by_index(node) -> bool:
    """True for the ops above: their tensor inputs must come from memory."""
    if getattr(node, "op", None) != "call_function" or node.target not in INDEXING:
        return False
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.numel() == 0 or val.dtype not in ops.TRITON_DTYPES:
        return False
    if node.target is aten.index.Tensor and not _integer_indices(node):
        return False   # boolean masks select a data-dependent count: extern
    return all(isinstance(arg.meta.get("val"), torch.Tensor)
               and arg.meta["val"].dtype in ops.TRITON_DTYPES for arg in node.all_input_nodes)


def _integer_indices(node) -> bool:
    indices = [i for i in node.args[1] if i is not None]
    return bool(indices) and all(
        hasattr(i, "meta") and isinstance(i.meta.get("val"), torch.Tensor)
        and i.meta["val"].dtype in (torch.int64, torch.int32) for i in indices)


def lower_indexing(node, writer) -> str:
    return INDEXING[node.target](node, writer)
