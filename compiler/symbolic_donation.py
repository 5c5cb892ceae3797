"""In-place updates (buffer donation) for the symbolic training step.

The static step writes new parameters and optimizer state over the inputs
they replace (``Program.updates``, passes/buffer_reuse.py ``_donations``), so
a step holds one copy of the model, not two. The symbolic step program
(step_dynamic.py) is an fx graph run by ``ArenaRunner`` (symbolic_plan.py);
``donations`` finds, once per program, which update outputs may be written
over their input, by the same rule as the static pass:

- the value is made by an aten op with an ``out=`` form (the torch calls) or
  is an output of a size-generic kernel (symbolic_fusion.py, whose launcher
  takes preallocated outputs), and is no view or alias of anything;
- it has the input's shape (static: parameters and state never take a
  symbolic size), strides and dtype, and appears once among the outputs;
- nothing reads the old value (the input, or any view of it) after the node
  that writes it, and that node, if it reads it, reads it element for element
  at its own index (a pointwise op or kernel given it at its own shape);
- the input is no output itself and is donated once.

What is checked per call (``ArenaRunner``): the input tensor has the
expected strides and shares its storage with no other input; where not,
that call allocates the value as before and the step copies it back.
"""

from __future__ import annotations

import operator

import sympy
import torch
import torch.utils._pytree as pytree
from retrograd.symbolic_plan import _ancestry, _escaping, _expr, _last_uses, out_overload
from torch import fx

__all__ = ["Donation", "donations"]


class Donation:
    """Where each donated value is written: node name -> placeholder position,
    and for a kernel call, output index -> placeholder position."""

    def __init__(self, nodes: dict[str, int], kernels: dict[str, dict[int, int]],
                 layouts: dict[int, tuple], written: frozenset[str]):
        self.nodes, self.kernels, self.layouts = nodes, kernels, layouts
        self.written = written   # every donated value's node (a kernel's: its getitem)

    def __len__(self) -> int:
        return len(self.nodes) + sum(len(v) for v in self.kernels.values())

    def targets(self, inputs: list) -> dict[int, torch.Tensor]:
        """This call's donated inputs (position -> tensor) that may be written:
        the expected layout, a storage no other input shares."""
        counts: dict[int, int] = {}
        for value in inputs:
            if isinstance(value, torch.Tensor):
                pointer = value.untyped_storage().data_ptr()
                counts[pointer] = counts.get(pointer, 0) + 1
        found = {}
        for position, (shape, strides, dtype) in self.layouts.items():
            value = inputs[position]
            if isinstance(value, torch.Tensor) and tuple(value.shape) == shape and \
                    value.stride() == strides and value.dtype == dtype and \
                    counts[value.untyped_storage().data_ptr()] == 1:
                found[position] = value
        return found


    def call(self, node: fx.Node, targets: dict[int, torch.Tensor]):
        """``node``'s op as a function of (args, kwargs) that writes over its
        donated input(s) in this call, or None."""
        position = self.nodes.get(node.name)
        if position is not None and position in targets:
            return lambda args, kwargs: out_overload(node.target)(*args, **kwargs,
                                                                  out=targets[position])
        items = self.kernels.get(node.name)
        if items and any(p in targets for p in items.values()):
            given = [targets.get(items.get(i, -1)) for i in range(len(node.meta["val"]))]
            return lambda args, kwargs: node.target(*args, **kwargs, out=given)
        return None


def _static_layout(value) -> tuple | None:
    """(shape, strides, dtype) of a tensor value whose sizes are all numbers."""
    if not isinstance(value, torch.Tensor):
        return None
    sizes = [_expr(s) for s in value.shape] + [_expr(s) for s in value.stride()]
    if not all(isinstance(s, sympy.Integer) for s in sizes):
        return None
    shape = tuple(int(s) for s in sizes[:value.dim()])
    return shape, tuple(int(s) for s in sizes[value.dim():]), value.dtype


def _writer(node: fx.Node) -> tuple[fx.Node, int | None] | None:
    """(the node that writes ``node``'s value, output index for a kernel) or None."""
    if node.op != "call_function":
        return None
    if node.target is operator.getitem:
        call = node.args[0]
        if isinstance(call, fx.Node) and hasattr(call.target, "source") and \
                getattr(call.target, "takes_out", False):
            return call, node.args[1]
        return None
    if out_overload(node.target) is None or isinstance(node.meta.get("val"), (tuple, list)):
        return None
    schema = getattr(node.target, "_schema", None)
    if schema is None or any(a.alias_info is not None for a in schema.arguments):
        return None
    return node, None


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _reads_in_place(writer: fx.Node, source: fx.Node, layout: tuple) -> bool:
    """``writer`` reads ``source`` only at the index it writes: a pointwise op
    (or kernel) given it directly at the written shape, through no alias."""
    kernel = hasattr(writer.target, "source")
    if not kernel and torch.Tag.pointwise not in getattr(writer.target, "tags", ()):
        return False
    if source not in writer.args or any(arg is not source and source in _ancestry(arg)
                                        for arg in writer.all_input_nodes):
        return False
    return _static_layout(source.meta.get("val")) == layout


def donations(gm: fx.GraphModule, updates: dict[int, int]) -> Donation:
    """The update outputs of ``gm`` that may be written over their inputs."""
    nodes = list(gm.graph.nodes)
    index = {node: i for i, node in enumerate(nodes)}
    placeholders = [node for node in nodes if node.op == "placeholder"]
    outputs = pytree.tree_flatten(nodes[-1].args[0])[0]
    last, escaping = _last_uses(nodes, index), _escaping(nodes)
    donated_nodes: dict[str, int] = {}
    kernels: dict[str, dict[int, int]] = {}
    layouts: dict[int, tuple] = {}
    written: list[str] = []
    for output, position in sorted(updates.items()):
        if output >= len(outputs) or position >= len(placeholders) or position in layouts:
            continue
        node, source = outputs[output], placeholders[position]
        if not isinstance(node, fx.Node) or outputs.count(node) != 1 or source in escaping:
            continue
        made = _writer(node)
        layout = _static_layout(node.meta.get("val"))
        if made is None or layout is None or layout != _static_layout(source.meta["val"]):
            continue
        writer, item = made
        if item is not None and layout[1] != _contiguous_strides(layout[0]):
            continue   # a kernel stores its outputs flat
        if last[source] > index[writer] or last[source] == index[writer] and \
                not _reads_in_place(writer, source, layout):
            continue
        if item is None:
            donated_nodes[node.name] = position
        else:
            kernels.setdefault(writer.name, {})[item] = position
        layouts[position] = layout
        written.append(node.name)
    return Donation(donated_nodes, kernels, layouts, frozenset(written))
