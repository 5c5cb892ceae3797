"""A memory plan sized at run time for a symbolic program's half.

A static program's buffers have byte offsets fixed at compile time
(passes/buffer_reuse.py); a symbolic program's sizes are symbols, so its
plan is a pure function of the symbols' values: ``SizedPlanner`` analyses
the graph once (which values may live in the arena, their sizes as sympy
expressions, their lifetimes), and ``plan`` evaluates it for one call's
sizes on first sight of them, cached: offsets by the greedy-by-size
interval packing of TFLite's arena planner (largest first, each at the
lowest offset free over its lifetime), a pointwise op's result placed over
its dying same-size input (the static planner's in-place reuse). The runner
(``ArenaRunner``, symbolic_runner.py) then allocates one arena per call, of that size's bytes
(``runtime/arena.py``), and calls each planned op's ``out=`` overload (or
size-generic kernel's launcher) into its view; everything else (values that
escape: outputs, saved tensors and their views; multi-output aten ops)
is an ordinary allocation, and every value is dropped
after its last use, as the fx program does.

What may live in the arena: the single contiguous tensor result of an aten
op that has an ``out=`` overload or of a sized reduction (its launcher
takes ``out=``), or a contiguous output of a size-generic elementwise
kernel (symbolic_kernel_slots.py: it may take the slot of a same-shape
input dying at the kernel), read only inside the call (neither it nor a
view of it is an output). The plan never raises the peak: for each size
it predicts the peak of the torch-call program (each value allocated when
made, freed after its last use, inputs left out) and of the arena program
(the arena held for the whole call, plus the values outside it), and runs
without an arena for a size where the arena would be larger (the plan says
so: ``arena=None``). Predicted, not measured: an op's own scratch memory
is in neither.
"""

from __future__ import annotations

import functools
import operator
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import sympy
import torch
from retrograd.passes.op_classes import is_view
from retrograd.symbolic_fusion import _contiguous
from retrograd.symbolic_kernel_slots import kernel_item, kernel_written_over
from torch import fx

__all__ = ["SizedPlan", "SizedPlanner", "out_overload"]

#: Every slot starts at a multiple of this many bytes (vector loads, any dtype).
ALIGN = 64
#: Sizes whose plans are kept (least recently used dropped first).
PLANS_KEPT = 64
#: Units one arena takes at most (bounds the packing's work on first sight).
WINDOW_UNITS = 64


@functools.cache
def out_overload(target: Any) -> Any | None:
    """The ``out=`` overload of an aten op whose other arguments are the
    functional overload's (``aten.add.Tensor`` -> ``aten.add.out``), else None."""
    packet = getattr(target, "overloadpacket", None)
    schema = getattr(target, "_schema", None)
    if packet is None or schema is None or len(schema.returns) != 1:
        return None
    names = [(argument.name, str(argument.type)) for argument in schema.arguments]
    for overload in packet.overloads():
        candidate = getattr(packet, overload)._schema
        outs = [a for a in candidate.arguments if a.is_out]
        if len(outs) == 1 and outs[0].name == "out" and \
                [(a.name, str(a.type)) for a in candidate.arguments if not a.is_out] == names:
            return getattr(packet, overload)
    return None


def _expr(size: Any) -> sympy.Expr:
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))


@dataclass(frozen=True)
class _Value:
    """A value that may live in the arena."""

    node: str
    shape: tuple[sympy.Expr, ...]
    dtype: torch.dtype
    start: int          # index of the node that makes it
    end: int            # index of its last reader (through views)
    over: str | None    # a pointwise op's same-shape input it may be written over


@dataclass
class SizedPlan:
    """The plan for one call's sizes: each planned value's arena (window) and
    offset, each arena's (first node, last node, bytes), and the predicted
    peaks it was chosen by (no arena at all when ``windows`` is empty)."""

    offsets: dict[str, tuple[int, int]]
    shapes: dict[str, tuple[int, ...]]
    windows: list[tuple[int, int, int]]
    predicted_peak: int
    predicted_peak_without: int

    @property
    def arena_bytes(self) -> int | None:
        """The largest arena, None when this size runs without one."""
        return max((b for _, _, b in self.windows), default=None)


class SizedPlanner:
    """One half's analysis, done once; ``plan(values)`` per size, cached."""

    def __init__(self, gm: fx.GraphModule, written: frozenset = frozenset()):
        nodes = list(gm.graph.nodes)
        self.index = {node: i for i, node in enumerate(nodes)}
        self.bindings = _bindings(nodes)
        last = _last_uses(nodes, self.index)
        escaping = _escaping(nodes)
        self.values: dict[str, _Value] = {}
        taken: set = set()   # (kernel call, input) pairs an output is written over
        for node in nodes:
            if node in escaping:
                continue
            if kernel_item(node):   # a size-generic kernel's output (symbolic_kernel_slots)
                maker = node.args[0]
                over = kernel_written_over(node, last, self.index, _ancestry, taken)
            elif _plannable(node):
                maker, over = node, _written_over(node, last, self.index)
            else:
                continue
            value = node.meta["val"]
            self.values[node.name] = _Value(node.name, tuple(_expr(s) for s in value.shape),
                                            value.dtype, self.index[maker], last[node], over)
        # every fresh allocation, for the predicted peaks: (name, start, end, shape, dtype);
        # ``written``: values written over an input (in-place updates) allocate nothing
        self.allocations = [(node.name, self.index[node], last[node],
                             tuple(_expr(s) for s in node.meta["val"].shape),
                             node.meta["val"].dtype)
                            for node in nodes if _allocates(node) and node.name not in written]
        self.plans: OrderedDict[tuple, SizedPlan] = OrderedDict()

    def symbols(self, args: list) -> tuple[int, ...]:
        """The symbols' values in this call (from the inputs' sizes)."""
        return tuple(int(args[slot]) if dim is None else int(args[slot].shape[dim])
                     for _, slot, dim in self.bindings)

    def plan(self, key: tuple[int, ...]) -> SizedPlan:
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = self._plan(dict(zip((s for s, _, _ in self.bindings), key)))
            if len(self.plans) > PLANS_KEPT:
                self.plans.popitem(last=False)
        else:
            self.plans.move_to_end(key)
        return plan

    def _plan(self, symbols: dict) -> SizedPlan:
        def evaluate(shape):
            return tuple(int(e.subs(symbols)) for e in shape)
        shapes = {name: evaluate(v.shape) for name, v in self.values.items()}
        sizes = {name: _nbytes(shapes[name], v.dtype) for name, v in self.values.items()}
        fresh = [(start, end, _nbytes(evaluate(shape), dtype))
                 for name, start, end, shape, dtype in self.allocations
                 if name not in self.values]
        without = _peak(fresh + [(v.start, v.end, sizes[n]) for n, v in self.values.items()])
        windows, offsets = _windows(self.values, sizes, fresh, without)
        if not windows:
            return SizedPlan({}, {}, [], without, without)
        peak = _peak(fresh + windows)
        return SizedPlan(offsets, shapes, windows, peak, without)


def _windows(values: dict[str, _Value], sizes: dict[str, int], fresh: list, limit: int):
    """Arenas (first node, last node, bytes) and each value's (arena, offset).

    Units (a value and the chain written over it, one slot) are taken in
    order of first use; each joins the open arena when the predicted peak
    with it stays within ``limit`` (the torch-call program's), else opens
    the next one: a single arena held whole would sit beside every value born
    meanwhile (design.md, "Arenas, one per window")."""
    shared = {name: v.over for name, v in values.items()
              if v.over in values and sizes[name] == sizes[v.over]}
    units = [name for _, name in sorted((v.start, name) for name, v in values.items()
                                         if name not in shared)]
    alone = [_pack([name], values, sizes, shared)[0] for name in units]
    groups: list[list[str]] = []
    closed: list[tuple[int, int, int]] = []
    packed = None
    for position, name in enumerate(units):
        if groups and len(groups[-1]) < WINDOW_UNITS:
            trial = _pack(groups[-1] + [name], values, sizes, shared)
            # the units still to come count as they are, each its own slot
            if _peak(fresh + closed + [trial[0]] + alone[position + 1:]) <= limit:
                groups[-1].append(name)
                packed = trial
                continue
        if packed is not None:
            closed.append(packed[0])
        groups.append([name])
        packed = _pack([name], values, sizes, shared)
    if packed is None:
        return [], {}
    windows, offsets = [], {}
    for number, group in enumerate(groups):
        window, places = _pack(group, values, sizes, shared)
        windows.append(window)
        offsets.update({n: (number, o) for n, o in places.items()})
    if _peak(fresh + windows) > limit:   # alignment or a chain's slot: never above
        return [], {}
    return windows, offsets


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    count = 1
    for size in shape:
        count *= size
    return count * dtype.itemsize


def _bindings(nodes: list[fx.Node]) -> list[tuple[sympy.Symbol, int, int | None]]:
    """(symbol, input position, dim or None for a SymInt input) for every
    symbol an input's size names first."""
    found, seen = [], set()
    placeholders = [node for node in nodes if node.op == "placeholder"]
    for slot, node in enumerate(placeholders):
        value = node.meta.get("val")
        sizes = [(None, value)] if isinstance(value, torch.SymInt) else \
            list(enumerate(value.shape)) if isinstance(value, torch.Tensor) else []
        for dim, size in sizes:
            expr = _expr(size)
            if isinstance(expr, sympy.Symbol) and expr not in seen:
                seen.add(expr)
                found.append((expr, slot, dim))
    return found


def aliased_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs whose storage ``node``'s value may share: the arguments its
    schema marks as aliased and not written (``view``'s ``Tensor(a) self``,
    ``split``'s ``Tensor(a -> *) self``), a reshape's input, and for an item
    of a multi-output op, what that op aliases (``split(x)[0]`` shares x's)."""
    if node.op != "call_function":
        return []
    if node.target is operator.getitem:
        parent = node.args[0]
        return aliased_inputs(parent) if isinstance(parent, fx.Node) else []
    found = [node.args[0]] if is_view(node) and isinstance(node.args[0], fx.Node) else []
    schema = getattr(node.target, "_schema", None)
    for position, argument in enumerate(schema.arguments if schema is not None else ()):
        if argument.alias_info is None or argument.alias_info.is_write:
            continue
        value = node.args[position] if position < len(node.args) else \
            node.kwargs.get(argument.name)
        found += [arg for arg in (value if isinstance(value, (list, tuple)) else [value])
                  if isinstance(arg, fx.Node) and arg not in found]
    return found


def _last_uses(nodes: list[fx.Node], index: dict) -> dict[fx.Node, int]:
    """Each node's last reader, the readers of anything sharing its storage
    (views, items of a split) counting for it."""
    last = {node: index[node] for node in nodes}
    for node in nodes:
        for arg in node.all_input_nodes:
            last[arg] = max(last[arg], index[node])
    for node in reversed(nodes):   # an alias's last use extends what it shares
        for base in aliased_inputs(node):
            last[base] = max(last[base], last[node])
    return last


def _escaping(nodes: list[fx.Node]) -> set[fx.Node]:
    """Outputs and everything whose storage they may share: they outlive the call."""
    output = next(node for node in reversed(nodes) if node.op == "output")
    return _alias_closure(output.all_input_nodes)


def _plannable(node: fx.Node) -> bool:
    """New memory an ``out=`` overload (or a sized reduction) can write,
    contiguous: an arena slot."""
    return _allocates(node) and _out_form(node.target) is not None \
        and _contiguous(node.meta["val"])


def _out_form(target: Any) -> Any | None:
    """What writes ``target``'s result into a given tensor (``out=``): its
    aten overload, or a sized reduction's launcher itself (symbolic_fusion)."""
    return target if getattr(target, "writes_out", False) else out_overload(target)


def _allocates(node: fx.Node) -> bool:
    """A node whose value is new memory (a tensor result that is no view)."""
    value = node.meta.get("val")
    return node.op == "call_function" and isinstance(value, torch.Tensor) \
        and not is_view(node) and not aliased_inputs(node)


def _written_over(node: fx.Node, last: dict, index: dict) -> str | None:
    """A pointwise op's input of its shape and dtype that dies at it."""
    if torch.Tag.pointwise not in getattr(node.target, "tags", ()):
        return None
    value = node.meta["val"]
    for arg in node.args:
        other = arg.meta.get("val") if isinstance(arg, fx.Node) else None
        if isinstance(other, torch.Tensor) and last[arg] == index[node] and \
                other.dtype == value.dtype and _contiguous(other) and \
                [str(s) for s in other.shape] == [str(s) for s in value.shape] and \
                not any(a is not arg and arg in _ancestry(a)
                        for a in node.all_input_nodes):   # read at other indices too
            return arg.name
    return None


def _ancestry(node: fx.Node) -> set[fx.Node]:
    """Every value whose storage ``node`` may share, through chains of aliases."""
    return _alias_closure(aliased_inputs(node))


def _alias_closure(start) -> set[fx.Node]:
    """``start`` and every value whose storage they may share, through chains
    of aliases (``aliased_inputs``)."""
    found, work = set(), list(start)
    while work:
        node = work.pop()
        if node not in found:
            found.add(node)
            work.extend(aliased_inputs(node))
    return found


def _pack(group: list[str], values: dict[str, _Value], sizes: dict[str, int],
          shared: dict[str, str]) -> tuple[tuple[int, int, int], dict[str, int]]:
    """One arena for ``group``'s units: ((first node, last node, bytes),
    offsets). Largest first, each at the lowest aligned offset free over its
    lifetime; the chain written over a unit shares its slot."""
    offsets: dict[str, int] = {}
    placed: list[tuple[int, int, int, int]] = []   # (offset, bytes, start, end)
    for name in sorted(group, key=lambda n: (-sizes[n], values[n].start)):
        chain = _sharing(name, shared)
        start = values[name].start
        end = max([values[name].end] + [values[other].end for other in chain])
        size = sizes[name]
        offset = 0
        for o, b, s, e in sorted(placed):
            if s <= end and start <= e and offset < o + b and o < offset + size:
                offset = -(-(o + b) // ALIGN) * ALIGN
        placed.append((offset, size, start, end))
        offsets.update({n: offset for n in [name, *chain]})
    window = (min(s for _, _, s, _ in placed), max(e for _, _, _, e in placed),
              max(o + b for o, b, _, _ in placed))
    return window, offsets


def _sharing(name: str, shared: dict[str, str]) -> list[str]:
    """The values written over ``name``, directly or down a chain."""
    found, frontier = [], {name}
    while frontier:
        frontier = {n for n, over in shared.items() if over in frontier}
        found.extend(sorted(frontier))
    return found


def _peak(allocations: list[tuple[int, int, int]]) -> int:
    """Largest live sum of (first node, last node, bytes): a value from its
    node through its last reader, the next node's result made beside it."""
    events = sorted([(start, 0, b) for start, _, b in allocations]
                    + [(end, 1, -b) for _, end, b in allocations])
    live = peak = 0
    for _, _, change in events:
        live += change
        peak = max(peak, live)
    return peak
