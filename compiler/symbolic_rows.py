"""Row-wise fused reductions in a symbolic program: softmax, log-softmax,
layer and RMS norms, forward and backward, as size-generic Triton kernels.

``fuse_rows`` finds groups of fx nodes over one contiguous space
``[..., n_cols]`` (the *full* shape, rows the product of the leading sizes):
elementwise nodes (``sized_pointwise.OPS``, ``where``) of the full shape or
of the row shape ``[..., 1]``, reductions over the last dimension (``sum``,
``mean``, ``amax``, ``var_mean``) and the softmax family as AOTAutograd
leaves it (``_softmax``, ``_log_softmax`` and their ``_backward_data``),
expanded into sums and maxima. Operands from outside are read at their own
offset, once per row, once (0-dim) or broadcast along a block of dimensions
(a norm's weight ``[n_cols]``, an attention mask ``[T, T]``). A group is
grown in node order: a node that fits joins it, a node that reads none of it
stays where it is (before the kernel, which is called where the group's last
node was), and a node that reads it and does not fit closes it. A group with
a reduction and at least two nodes becomes one kernel of
``codegen/sized_rows.py``; anything else is left to the pointwise runs and
sized reductions of ``symbolic_fusion.py`` (or torch calls).
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy
import torch
from retrograd.codegen.sized_pointwise import DTYPES, OPS, small_power
from retrograd.codegen.sized_rows import RowGroup, rows_source
from retrograd.runtime.device import interpreter_mode
from retrograd.runtime.executor import without_cycles
from retrograd.runtime.loader import load_module, write_source
from retrograd.symbolic_fusion import (
    _as_loaded,
    _broadcast_scalar,
    _contiguous,
    _same_shape,
    broadcast_block,
    broadcast_sizes,
)
from retrograd.symbolic_row_steps import safe_name
from retrograd.symbolic_row_steps import steps as _steps
from torch import fx

__all__ = ["fuse_rows"]

aten = torch.ops.aten

#: Reductions over the last dimension, and the softmax family (over the last dimension).
REDUCING = {aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.var_mean.correction}
SOFTMAX = {aten._softmax.default, aten._log_softmax.default,
           aten._softmax_backward_data.default, aten._log_softmax_backward_data.default}
WHERE = aten.where.self


class Space:
    """The full shape a group works over (its sizes as strings), dtype and device."""

    def __init__(self, value: torch.Tensor):
        self.shape = value.shape
        self.full = [str(s) for s in value.shape]
        self.row = self.full[:-1] + ["1"]
        self.dtype, self.device = value.dtype, value.device

    def kind(self, value: Any) -> str | None:
        """"full" or "row" for a value of this space (dtype, device, shape)."""
        if not isinstance(value, torch.Tensor) or value.dtype != self.dtype or \
                value.device != self.device or not _contiguous(value):
            return None
        shape = [str(s) for s in value.shape]
        return "full" if shape == self.full else "row" if shape == self.row else None

    def load(self, value: Any, boolean: bool = False) -> str | None:
        """How a kernel of this space reads an operand from outside (sized_rows)."""
        if not isinstance(value, torch.Tensor) or value.device != self.device or \
                (value.dtype != (torch.bool if boolean else self.dtype)):
            return None
        if value.dim() == 0 or (_broadcast_scalar(value) and not _contiguous(value)):
            return "once"
        if not _contiguous(value):
            return None
        if _same_shape(value, self.shape):
            return "full"
        if [str(s) for s in value.shape] == self.row:
            return "row"
        return "broadcast" if broadcast_block(value, self.shape) is not None else None


def _last_dim(dims: Any, rank: int) -> bool:
    dims = [dims] if isinstance(dims, int) else dims
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] % rank == rank - 1


def _space_of(node: fx.Node) -> Space | None:
    """The space a node would start a group in: its input's for a reduction or
    the softmax family, its own for an elementwise node."""
    if node.op != "call_function":
        return None
    if node.target in REDUCING or node.target in SOFTMAX:
        source = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    else:
        source = node.meta.get("val")
    if not isinstance(source, torch.Tensor) or source.dtype not in DTYPES or \
            source.dim() == 0 or str(source.shape[-1]) == "1":
        return None
    return Space(source)


def _operand(arg: Any, space: Space, members: dict, boolean: bool = False) -> str | None:
    """"full"/"row" for a member's value or an operand read from outside, or
    "number" for a finite Python number; None where it does not fit."""
    if not isinstance(arg, fx.Node):
        ok = isinstance(arg, (int, float)) and not isinstance(arg, bool) and math.isfinite(arg)
        return "number" if ok and not boolean else None
    if arg in members:
        return members[arg]
    load = space.load(arg.meta.get("val"), boolean)
    return None if load is None else "row" if load in ("row", "once") else "full"


def _fits(node: fx.Node, space: Space, members: dict) -> str | None:
    """The kind ("full", "row" or "tuple" for var_mean) ``node`` takes in a
    group of ``space`` with ``members`` (node -> kind), else None."""
    if node.op != "call_function":
        return None
    target, args, value = node.target, node.args, node.meta.get("val")
    if target is operator.getitem:
        if args[0] not in members or args[0].target is not aten.var_mean.correction:
            return None
        return "row" if _keepdim(args[0]) else "flat"
    if target in OPS or target is WHERE:
        kind = space.kind(value)
        if node.kwargs or kind is None or not small_power(target, args):
            return None
        kinds = [_operand(a, space, members, target is WHERE and i == 0)
                 for i, a in enumerate(args)]
        if None in kinds or "flat" in kinds or not any(isinstance(a, fx.Node) for a in args) \
                or (kind == "row" and "full" in kinds):
            return None
        return kind
    if target in REDUCING:
        return _fits_reduction(node, space, members)
    if target in SOFTMAX:
        backward = "backward" in str(target)
        tensors = args[:2] if backward else args[:1]
        plain = args[3] == space.dtype if backward else not args[2]   # no dtype change
        if node.kwargs or not plain or not _last_dim(args[2 if backward else 1],
                                                       len(space.full)) or \
                any(_operand(a, space, members) != "full" for a in tensors) or \
                space.kind(value) != "full":
            return None
        return "full"
    return None


def _keepdim(node: fx.Node) -> bool:
    return bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False))


def _fits_reduction(node: fx.Node, space: Space, members: dict) -> str | None:
    """A sum, mean, amax or var_mean over the last dimension of a full value."""
    target, args, kwargs = node.target, node.args, dict(node.kwargs)
    keepdim = kwargs.pop("keepdim", args[2] if len(args) > 2 else False)
    correction = kwargs.pop("correction", 1) if target is aten.var_mean.correction else 0
    if kwargs or not isinstance(args[0], fx.Node) or len(args) < 2 or \
            not _last_dim(args[1], len(space.full)) or \
            _operand(args[0], space, members) != "full" or \
            not isinstance(correction, (int, float)):
        return None
    if target is aten.var_mean.correction:
        return "tuple"
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor) or value.dtype != space.dtype:
        return None
    expected = space.row if keepdim else space.full[:-1]
    return ("row" if keepdim else "flat") if [str(s) for s in value.shape] == expected \
        else None


def _groups(graph: fx.Graph) -> list[tuple[list[fx.Node], Space]]:
    """Groups in node order (module docstring), those worth a kernel."""
    groups, members, space = [], {}, None
    for node in graph.nodes:
        if members:
            kind = _fits(node, space, members)
            if kind is not None:
                members[node] = kind
                continue
            if node.op != "output" and not _mutates(node) and \
                    not any(a in members for a in node.all_input_nodes):
                continue   # reads none of the group: stays before the kernel
            _keep(groups, members, space)
            members, space = {}, None
        start = _space_of(node)
        kind = _fits(node, start, {}) if start is not None else None
        if kind is not None:
            members, space = {node: kind}, start
    if members:
        _keep(groups, members, space)
    return groups


def _mutates(node: fx.Node) -> bool:
    """An op that may write a tensor (``copy_`` into an input, an opaque
    call): the group may not be moved past it (it might write what a member
    reads). Reading a constant (``get_attr``) writes nothing."""
    if node.op == "get_attr":
        return False
    if node.op != "call_function":
        return True
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return schema.is_mutable
    return node.target is not operator.getitem and \
        not isinstance(node.meta.get("val"), torch.SymInt)


def _keep(groups: list, members: dict, space: Space) -> None:
    """Keep a group with a reduction and two nodes or more, every tuple's
    items inside it."""
    nodes = list(members)
    reduces = any(n.target in REDUCING or n.target in SOFTMAX for n in nodes)
    tuples_closed = all(user in members for n in nodes if members[n] == "tuple"
                        for user in n.users)
    if reduces and tuples_closed and (len(nodes) > 1 or nodes[0].target in SOFTMAX):
        groups.append((nodes, space))


def _line(node: fx.Node) -> str:
    """A covered node as the kernel's header shows it."""
    if node.target is operator.getitem:
        return f"{node.name} = {node.args[0]}[{node.args[1]}]"
    args = [str(a) for a in node.args] + [f"{k}={v}" for k, v in node.kwargs.items()]
    return f"{node.name} = {node.target}({', '.join(args)})"


def _group(nodes: list[fx.Node], space: Space, kinds: dict) -> tuple[RowGroup, list, list]:
    """(RowGroup, input nodes, output nodes) of one group."""
    inside = set(nodes)
    names: dict = {}
    inputs: list[fx.Node] = []
    loads: list[tuple[str, str]] = []
    booleans = set()
    for node in nodes:
        for i, arg in enumerate(node.args):
            if isinstance(arg, fx.Node) and arg not in inside and arg not in names:
                boolean = node.target is WHERE and i == 0
                names[arg] = safe_name(arg.name)
                inputs.append(arg)
                loads.append((names[arg], space.load(arg.meta["val"], boolean)))
                if boolean:
                    booleans.add(names[arg])
    steps = []
    for node in nodes:
        names["kind", node] = kinds[node]
        if node.target is operator.getitem:
            names[node] = f"{node.args[0].name}_{('var', 'mean')[node.args[1]]}"
            continue
        steps += _steps(node, names)
        names[node] = safe_name(node.name)
    outputs = [node for node in nodes if kinds[node] != "tuple"
               and any(user not in inside for user in node.users)]
    covered = [_line(n) for n in nodes]
    stored = [(safe_name(n.name), names[n], "full" if kinds[n] == "full" else "row")
              for n in outputs]
    group = RowGroup(loads, steps, stored, covered, space.dtype, booleans)
    return group, inputs, outputs


def _launcher(name: str, source: str, group: RowGroup, rank: int, keeps: list[bool | None],
              blocks: list[tuple[int, int]], interpreted: bool):
    """A function of the input tensors that allocates the outputs (``keeps``:
    None for the full shape, True for ``[..., 1]``, False for ``[...]``) and
    launches one program per block of rows; ``blocks``: the broadcast
    inputs' blocks (``broadcast_block``), as traced."""
    launch = load_module(write_source(name, source), interpreted).launch
    launch = without_cycles(launch) if interpreted else launch
    loads = [load for _, load in group.inputs]
    dtype = group.dtype

    def run(*tensors, out=None):
        """``out``: a preallocated tensor (or None) per output (arena slots)."""
        shape = tuple(torch.broadcast_shapes(*(t.shape for t in tensors)))
        if len(shape) != rank:
            raise RuntimeError(f"retrograd: size-generic kernel {name} was traced over "
                               f"{rank} dimensions and got inputs of shape {shape}")
        tensors = [_as_loaded(t, load == "once", name) for t, load in zip(tensors, loads)]
        results = [given if given is not None else
                   torch.empty(shape if keep is None else shape[:-1] + (1,) * keep,
                               dtype=dtype, device=tensors[0].device)
                   for keep, given in zip(keeps, out or [None] * len(keeps))]
        n_rows, n_cols = math.prod(shape[:-1]), shape[-1]
        if n_rows:
            block = max(16, min(1 << max(n_cols - 1, 0).bit_length(), 1024))
            rows = max(1, min(1 << (n_rows - 1).bit_length(), 4096 // block)) \
                if interpreted else 1
            with interpreter_mode(interpreted), numpy.errstate(all="ignore"):
                launch(rows, block, n_rows, n_cols, *tensors, *results,
                       *broadcast_sizes(shape, blocks))
        return tuple(results)
    run.__name__ = run.__qualname__ = name
    run.source, run.takes_out = source, True
    return run


def _replace(gm: fx.GraphModule, nodes: list[fx.Node], space: Space, kinds: dict,
             interpreted: bool) -> None:
    """Call the group's kernel where its last node was; its outputs replace the nodes."""
    group, inputs, outputs = _group(nodes, space, kinds)
    title = next(n for n in nodes if n.target in REDUCING or n.target in SOFTMAX).name
    name, source = rows_source(group, safe_name(title).lstrip("_"))
    rank = len(space.full)
    keeps = [None if kinds[n] == "full" else kinds[n] == "row" for n in outputs]
    blocks = [broadcast_block(n.meta["val"], space.shape) for n, (_, load)
              in zip(inputs, group.inputs) if load == "broadcast"]
    launcher = _launcher(name, source, group, rank, keeps, blocks, interpreted)
    with gm.graph.inserting_after(nodes[-1]):
        call = gm.graph.call_function(launcher, tuple(inputs))
    call.meta["val"] = tuple(node.meta["val"] for node in outputs)
    previous = call
    inside = set(nodes)
    for index, node in enumerate(outputs):
        with gm.graph.inserting_after(previous):
            item = gm.graph.call_function(operator.getitem, (call, index))
        item.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(item, delete_user_cb=lambda user: user not in inside)
        previous = item
    for node in reversed(nodes):
        gm.graph.erase_node(node)


def fuse_rows(gm: fx.GraphModule, interpreted: bool) -> int:
    """Replace each row group (module docstring) by one size-generic kernel;
    returns how many."""
    groups = _groups(gm.graph)
    for nodes, space in groups:
        kinds = {}
        for node in nodes:
            kinds[node] = _fits(node, space, kinds)
        _replace(gm, nodes, space, kinds, interpreted)
    return len(groups)
