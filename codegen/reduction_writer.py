"""The body of a reduction kernel: coordinates, loads, nodes, and walks over the extent.

``ReductionWriter`` collects the lines of one kernel body; ``levels`` says
how many reductions must finish before each node can be computed;
``walk`` emits one walk over the reduced extent (the prologue nodes a set of
reductions needs, their accumulation, full stores, then the combination of
the lanes). ``reduction.py`` (one kernel: looped or persistent) and
``reduction_split.py`` (partials per program, then a combine) both write
their kernels with these.

In the *persistent* case (the extent fits one block: ``writer.persistent``)
a walk is no loop at all: the row is loaded once, every full node is
computed once and stays in registers for the later steps, which reuse it
instead of loading and recomputing it (Inductor's persistent reductions).
"""

from __future__ import annotations

import math
import operator

import torch
from retrograd.codegen import online_softmax, ops
from retrograd.codegen import reduction_kinds as kinds
from retrograd.codegen.common import mentions
from retrograd.codegen.layout import contiguous_strides
from retrograd.codegen.reduction_kinds import REDUCTIONS, describe_reduction
from retrograd.ir import Buffer, Kernel

__all__ = ["ReductionWriter", "full_ancestors", "levels", "row_nodes_at", "walk"]


class ReductionWriter:
    """The body of one reduction kernel, loop by loop."""

    def __init__(self, kernel: Kernel, buffers: dict[str, Buffer]):
        self.kernel, self.buffers = kernel, buffers
        self.full_shape = tuple(kernel.full_shape)
        self.reduced = tuple(kernel.reduced_dims)
        self.extent = kernel.extent
        self.group = {node.name: node for node in kernel.nodes}
        self.lines: list[str] = []
        self.indent = "    "
        self.dtypes: dict[str, torch.dtype] = {}
        self.row_loads: dict[tuple, str] = {}
        self.loop_loads: dict[tuple, str] = {}
        self.row_coordinates: dict[tuple, str] = {}
        self.loop_coordinates: dict[int, str] = {}
        self.computed: set[str] = set()    # full nodes already in registers
        self.persistent = False            # the extent fits one block: no loops
        self.persistent_started = False

    def emit(self, line: str) -> None:
        self.lines.append(self.indent + line)

    def is_full(self, node) -> bool:
        val = node.meta.get("val")
        return (node.target not in REDUCTIONS and node.target is not operator.getitem
                and isinstance(val, torch.Tensor) and tuple(val.shape) == self.full_shape)

    # -- coordinates and indices --------------------------------------------
    def _row_coordinate(self, shape: tuple, dim: int) -> str:
        key = (shape, dim)
        if key not in self.row_coordinates:
            inner = math.prod(shape[dim + 1:])
            text = "rows" if inner == 1 else f"(rows // {inner})"
            if dim > 0:
                text = f"{text} % {shape[dim]}"
            name = f"r{len(self.row_coordinates)}"
            self.lines.insert(self.prologue_end, f"    {name} = {text}  # dim {dim} of {shape}")
            self.prologue_end += 1
            self.row_coordinates[key] = name
        return self.row_coordinates[key]

    def _full_coordinate(self, dim: int) -> str:
        if dim not in self.reduced:
            kept = tuple(self.full_shape[d] for d in range(len(self.full_shape))
                         if d not in self.reduced)
            position = [d for d in range(len(self.full_shape)) if d not in self.reduced].index(dim)
            return self._row_coordinate(kept, position)
        if dim not in self.loop_coordinates:
            shape = tuple(self.full_shape[d] for d in self.reduced)
            position = self.reduced.index(dim)
            inner = math.prod(shape[position + 1:])
            text = "ks" if inner == 1 else f"(ks // {inner})"
            if position > 0:
                text = f"{text} % {shape[position]}"
            name = f"k{len(self.loop_coordinates)}"
            self.emit(f"{name} = {text}  # reduced dim {dim}")
            self.loop_coordinates[dim] = name
        return self.loop_coordinates[dim]

    def full_index(self, shape, strides) -> str:
        lead = len(self.full_shape) - len(shape)
        terms = []
        for dim, (size, stride) in enumerate(zip(shape, strides)):
            if size == 1 or stride == 0:
                continue
            coordinate = self._full_coordinate(dim + lead)
            terms.append(coordinate if stride == 1 else f"{coordinate} * {stride}")
        return " + ".join(terms) or "0 * ks"

    def row_index(self, shape, strides, consumer_shape) -> str:
        shape, consumer_shape = tuple(shape), tuple(consumer_shape)
        if shape == consumer_shape and tuple(strides) == contiguous_strides(shape):
            return "rows"
        lead = len(consumer_shape) - len(shape)
        terms = []
        for dim, (size, stride) in enumerate(zip(shape, strides)):
            if size == 1 or stride == 0:
                continue
            coordinate = self._row_coordinate(consumer_shape, dim + lead)
            terms.append(coordinate if stride == 1 else f"{coordinate} * {stride}")
        return " + ".join(terms) or "0 * rows"

    # -- operands -------------------------------------------------------------
    def operand(self, consumer, arg, cast_to=None, full=False) -> str:
        if not hasattr(arg, "op"):
            if cast_to is not None and cast_to.is_floating_point and isinstance(arg, int) \
                    and not isinstance(arg, bool):
                return ops.literal(float(arg))
            return ops.literal(arg)
        name = self.kernel.aliases.get(arg.name, arg.name)
        if name in self.group and not (ops.is_fill(self.group[name])
                                       and name not in self.kernel.outputs):
            variable = name
        elif ops.is_fill(arg):
            return ops.literal(ops.fill_value(arg))
        else:
            variable = self._load(arg.name, consumer, full)
        if cast_to is not None and self.dtypes[variable] != cast_to:
            return f"{variable}.to({ops.triton_dtype(cast_to)})"
        return variable

    def address(self, buffer, consumer, full: bool) -> tuple[str, str]:
        """Index and mask of ``buffer`` in the loop over the reduced elements
        (``full``), or once per row, as the node ``consumer`` uses it."""
        if full:
            return self.full_index(buffer.shape, buffer.strides), "mask"
        return (self.row_index(buffer.shape, buffer.strides, consumer.meta["val"].shape),
                "row_mask")

    def _load(self, name: str, consumer, full: bool) -> str:
        buffer = self.buffers[name]
        cache = self.loop_loads if full else self.row_loads
        key = (name, "full") if full else (name, tuple(consumer.meta["val"].shape))
        if key not in cache:
            index, mask = self.address(buffer, consumer, full)
            variable = f"{name}_{'in' if full else 'row'}{len(cache)}"
            dtype = getattr(torch, buffer.dtype)
            text = f"tl.load({name}_ptr + {index}, mask={mask}, other=0)"
            if ops.compute_dtype(dtype) != dtype:
                text += ".to(tl.float32)"
            self.emit(f"{variable} = {text}")
            self.dtypes[variable] = ops.compute_dtype(dtype)
            cache[key] = variable
        return cache[key]

    # -- nodes ------------------------------------------------------------------
    def pointwise(self, node, full: bool) -> None:
        used: list[str] = []

        def operand(arg, cast_to=None):
            text = self.operand(node, arg, cast_to, full)
            used.append(text)
            return text

        expression = ops.lower(node, operand)
        dtype = ops.compute_dtype(node.meta["val"].dtype)
        if dtype != torch.bool and {self.dtypes[v] for v in self.dtypes
                                    if mentions(used, v)} - {dtype}:
            expression = f"({expression}).to({ops.triton_dtype(dtype)})"
        self.emit(f"{node.name} = {expression}")
        self.dtypes[node.name] = dtype

    def getitem(self, node) -> None:
        source, index = node.args
        part = kinds.PARTS[describe_reduction(source)[2]][index]
        self.emit(f"{node.name} = {source.name}_{part}")
        self.dtypes[node.name] = self.dtypes[f"{source.name}_{part}"]

    def store(self, name: str, full: bool) -> None:
        buffer = self.buffers[name]
        index, mask = self.address(buffer, self.group[name], full)
        dtype = getattr(torch, buffer.dtype)
        value = name
        if dtype == torch.bfloat16:
            value = f"_round_to_bf16({value}).to(tl.bfloat16)"
        elif dtype != self.dtypes[name]:
            value = f"{value}.to({ops.triton_dtype(dtype)})"
        self.emit(f"tl.store({name}_ptr + {index}, {value}, mask={mask})")


def levels(kernel: Kernel, writer: ReductionWriter, online=None) -> dict[str, int]:
    """How many reduction loops must finish before each node can be computed.
    ``online`` (``online_softmax.online_pairs``): sums computed beside their max."""
    level: dict[str, int] = {}
    for node in kernel.nodes:
        if ops.is_fill(node):   # a literal: needs nothing (its argument gives a shape)
            level[node.name] = 0
            continue
        if online and node.name in online:
            level[node.name] = level[online[node.name][0].name]
            continue
        args = [a for a in node.all_input_nodes if a.name in writer.group
                or writer.kernel.aliases.get(a.name) in writer.group]
        arg_levels = [level[writer.kernel.aliases.get(a.name, a.name)] for a in args]
        base = max(arg_levels, default=0)
        level[node.name] = base + 1 if node.target in REDUCTIONS else base
    return level


def full_ancestors(targets, writer: ReductionWriter) -> list:
    """The full nodes a loop must compute for ``targets``, in kernel order."""
    needed, work = set(), list(targets)
    while work:
        node = work.pop()
        for arg in node.all_input_nodes:
            name = writer.kernel.aliases.get(arg.name, arg.name)
            source = writer.group.get(name)
            if source is not None and writer.is_full(source) and source.name not in needed:
                needed.add(source.name)
                work.append(source)
    return [node for node in writer.kernel.nodes if node.name in needed]


def walk(writer: ReductionWriter, reductions: list, stores: list, comment: str,
         span: str | None = None, finish: bool = True, online=None) -> None:
    """One walk over the reduced extent: prologue nodes, accumulate, store,
    then (``finish``) combine the lanes. ``span``: the loop's range when it
    covers part of the extent (a split reduction's chunk), else the whole.
    ``online``: sums of exponentials updated beside their max (online_softmax)."""
    online = {n.name: online[n.name] for n in reductions if online and n.name in online}
    targets = [n for n in reductions if n.name not in online] + \
        [writer.group[name] for name in stores]
    full = full_ancestors(targets, writer) + [n for n in targets if writer.is_full(n)
                                                and n not in reductions]
    seen, ordered = set(), []
    for node in writer.kernel.nodes:
        if node in full and node.name not in seen:
            seen.add(node.name)
            ordered.append(node)
    writer.emit(f"# {comment}")
    for node in reductions:
        kinds.initialise(writer, node)
    if writer.persistent:   # the whole row is in registers: loaded and computed once
        if not writer.persistent_started:
            writer.emit("ks = tl.arange(0, RBLOCK)[None, :]   # [1, RBLOCK]: the whole row")
            writer.emit(f"mask = row_mask & (ks < {writer.extent})")
            writer.persistent_started = True
    else:
        writer.emit(f"for k_start in range({span or f'0, {writer.extent}'}, RBLOCK):")
        writer.indent = "        "
        writer.emit("ks = k_start + tl.arange(0, RBLOCK)[None, :]   # [1, RBLOCK]")
        writer.emit(f"mask = row_mask & (ks < {writer.extent})")
        writer.loop_loads, writer.loop_coordinates, writer.computed = {}, {}, set()
    for node in ordered:
        if not (ops.is_fill(node) and node.name not in writer.kernel.outputs) \
                and node.name not in writer.computed:
            writer.pointwise(node, full=True)
            writer.computed.add(node.name)
    for node in reductions:   # an online sum first: it reads its max's previous lanes
        if node.name in online:
            online_softmax.update(writer, node, *online[node.name])
    for node in reductions:
        if node.name not in online:
            kinds.accumulate(writer, node)
    for name in stores:
        writer.store(name, full=True)
    writer.indent = "    "
    for node in reductions if finish else []:
        if node.name in online:
            online_softmax.finish(writer, node, online[node.name][0])
        else:
            kinds.finish(writer, node)


def row_nodes_at(writer: ReductionWriter, depths: dict[str, int], level: int) -> None:
    """Emit the row nodes (one value per row) that need exactly ``level``
    reductions: loaded row values at 0, the epilogue after."""
    for node in writer.kernel.nodes:
        if writer.is_full(node) or node.target in REDUCTIONS or depths[node.name] != level:
            continue
        if ops.is_fill(node) and node.name not in writer.kernel.outputs:
            continue   # a literal where it is read
        if node.target is operator.getitem:
            writer.getitem(node)
        else:
            writer.pointwise(node, full=False)
