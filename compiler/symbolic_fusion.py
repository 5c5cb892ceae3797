"""Size-generic Triton kernels in a symbolic program.

A symbolic program (dynamic.py) is AOTAutograd's graph with symbolic sizes,
run as torch calls. ``fuse_pointwise`` first hands row-wise reductions
(softmax, norms and their backward) to ``symbolic_rows.py``; then it
replaces each run of consecutive elementwise nodes of one shape and one
dtype (float32/float64, contiguous; ``codegen/sized_pointwise.py`` lists
the ops), which may end in a full sum or mean, by one Triton kernel that
takes its element count at run time: one kernel for every size, its
outputs allocated at run time from the inputs' sizes. An operand may be a
0-dim value or broadcast along one block of the run's dimensions (a bias
``[C]``, a per-row ``[s0, 1]``: ``broadcast_block``), read at
``(i // inner) % span`` with both counts launch arguments. A run is
contiguous in node order (size computations that use none of it aside), so
all its inputs exist before its first node; it stores every value a node
outside it (or the graph's output) uses, and the kernel is called where its
last node was. Sums and means over a leading or a trailing block of
dimensions of a contiguous float tensor (bias gradients, per-token sums)
become kernels of ``codegen/sized_reduction.py``, rows and columns counted
at run time. Everything else stays a torch call.

This is a small fuser of its own, not retrograd's fusion pass: that pass,
the checkpoint planner and the buffer planner work on concrete sizes.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy
import sympy
import torch
from retrograd.codegen.sized_pointwise import (
    DTYPES,
    OPS,
    REDUCTIONS,
    expression,
    kernel_source,
    small_power,
)
from retrograd.codegen.sized_reduction import reduction_source
from retrograd.runtime.device import interpreter_mode
from retrograd.runtime.executor import without_cycles
from retrograd.runtime.loader import load_module, write_source
from torch import fx

__all__ = ["fuse_pointwise", "kernel_sources"]

aten = torch.ops.aten


def _expr(size: Any):
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))


def _contiguous(value: torch.Tensor) -> bool:
    """Strides equal the contiguous ones, compared as expressions (no guard added)."""
    expected = sympy.Integer(1)
    for size, stride in reversed(list(zip(value.shape, value.stride()))):
        if _expr(size) != 1 and sympy.expand(_expr(stride) - expected) != 0:
            return False
        expected = expected * _expr(size)
    return True


def _broadcast_scalar(value: torch.Tensor) -> bool:
    """One value seen at every position (an ``expand`` of a 0-dim tensor: every
    stride 0), loaded once by the kernel."""
    return all(_expr(stride) == 0 for stride in value.stride())


def _loaded_once(value: torch.Tensor) -> bool:
    return value.dim() == 0 or (_broadcast_scalar(value) and not _contiguous(value))


def _same_shape(value: torch.Tensor, shape) -> bool:
    return [str(s) for s in value.shape] == [str(s) for s in shape]


def broadcast_block(value: torch.Tensor, shape) -> tuple[int, int] | None:
    """(a, b) where contiguous ``value`` broadcasts to ``shape`` along every
    dimension outside ``shape``'s block [a, b) (leading ones added): its
    element for flat position ``i`` of ``shape`` is ``(i // inner) % span``,
    ``inner`` the product of ``shape[b:]`` and ``span`` of ``shape[a:b]``.
    None for anything else (a strided or interleaved broadcast)."""
    extra = len(shape) - value.dim()
    if extra < 0 or not _contiguous(value):
        return None
    sizes = [sympy.Integer(1)] * extra + [_expr(s) for s in value.shape]
    kept = [d for d, size in enumerate(sizes) if size != 1]
    a, b = (min(kept), max(kept) + 1) if kept else (len(shape), len(shape))
    if any(sizes[d] != _expr(shape[d]) for d in range(a, b)):
        return None
    return a, b


def _operand(value: Any, node_value: torch.Tensor, boolean: bool = False) -> str | None:
    """How a pointwise run loads a tensor operand of a node: "full" (its own
    offsets), "once" (a 0-dim or every-stride-0 value) or "broadcast"; None:
    not fusable. ``boolean``: a ``where``'s condition (a bool tensor)."""
    dtype = torch.bool if boolean else node_value.dtype
    if not isinstance(value, torch.Tensor) or \
            (value.dtype, value.device) != (dtype, node_value.device):
        return None
    if value.dim() == 0:
        return "once"
    if _same_shape(value, node_value.shape):
        return "full" if _contiguous(value) or _broadcast_scalar(value) else None
    return "broadcast" if broadcast_block(value, node_value.shape) is not None else None


def _kind(node: fx.Node) -> tuple | None:
    """(shape, dtype, device) of an elementwise node this fuser takes, else None."""
    value = node.meta.get("val")
    if (node.op != "call_function" or node.target not in OPS or node.kwargs
            or not isinstance(value, torch.Tensor) or value.dtype not in DTYPES
            or not _contiguous(value) or not small_power(node.target, node.args)):
        return None
    kind = (tuple(str(s) for s in value.shape), value.dtype, value.device)
    tensors = [arg for arg in node.args if isinstance(arg, fx.Node)]
    if not tensors:
        return None
    for index, arg in enumerate(node.args):
        if isinstance(arg, fx.Node):
            boolean = node.target is aten.where.self and index == 0
            if _operand(arg.meta.get("val"), value, boolean) is None:
                return None
        elif (node.target is aten.where.self and index == 0) or isinstance(arg, bool) \
                or not isinstance(arg, (int, float)) \
                or not math.isfinite(arg):   # inf and nan have no plain literal
            return None
    return kind


def _transparent(node: fx.Node, run: list[fx.Node]) -> bool:
    """A size computation (``sym_size``) that uses nothing of ``run``: it may sit
    between two nodes of a run (it stays where it is, before the kernel)."""
    return (node.op == "call_function" and isinstance(node.meta.get("val"), torch.SymInt)
            and not any(arg in run for arg in node.all_input_nodes))


def _reduces(node: fx.Node, run: list[fx.Node]) -> bool:
    """A sum or mean of every element of a value of ``run``, in its dtype."""
    return (node.op == "call_function" and node.target in REDUCTIONS and len(node.args) == 1
            and not node.kwargs and node.args[0] in run
            and node.meta["val"].dtype == node.args[0].meta["val"].dtype)


def _runs(graph: fx.Graph) -> list[list[fx.Node]]:
    """Maximal runs of consecutive nodes of one kind (size computations aside)."""
    runs, current, current_kind = [], [], None
    for node in graph.nodes:
        kind = _kind(node)
        if kind is not None and (not current or kind == current_kind):
            current.append(node)
            current_kind = kind
            continue
        if current and _transparent(node, current):
            continue
        if current and _reduces(node, current):   # the run ends in it
            current.append(node)
            runs.append(current)
            current, current_kind = [], None
            continue
        if current:
            runs.append(current)
        current, current_kind = ([node], kind) if kind is not None else ([], None)
    if current:
        runs.append(current)
    return runs


def _source(run: list[fx.Node]) -> tuple[str, str, list[fx.Node], list[fx.Node]]:
    """(kernel name, source, input nodes, output nodes) of one run."""
    inside = set(run)
    inputs: list[fx.Node] = []
    for node in run:
        for arg in node.args:
            if isinstance(arg, fx.Node) and arg not in inside and arg not in inputs:
                inputs.append(arg)
    tail = run[-1] if run[-1].target in REDUCTIONS else None
    pointwise = run[:-1] if tail is not None else run
    outputs = [node for node in pointwise if any(user not in inside for user in node.users)]
    names = {node: f"in{i}" for i, node in enumerate(inputs)}
    names.update({node: f"v{i}" for i, node in enumerate(run)})
    lines = [(names[node], expression(node.target, [
        names[arg] if isinstance(arg, fx.Node) else repr(float(arg)) for arg in node.args],
        node.args)) for node in pointwise]
    shape = run[0].meta["val"].shape
    scalars = [names[n] for n in inputs if _loaded_once(n.meta["val"])]
    broadcast = [names[n] for n in inputs if names[n] not in scalars
                 and not _same_shape(n.meta["val"], shape)]
    reduction = None if tail is None else (names[tail], names[tail.args[0]], tail.target,
                                           tail.meta["val"].dtype)
    name, source = kernel_source([names[n] for n in inputs], [names[n] for n in outputs],
                                 lines, [node.name for node in run], scalars, reduction,
                                 broadcast)
    return name, source, inputs, outputs + ([tail] if tail is not None else [])


def _loads(inputs: list[fx.Node], shape) -> list[Any]:
    """Per input of a run of ``shape``: True (loaded once), False (at the run's
    offsets) or the block (a, b) it is broadcast along (``broadcast_block``)."""
    loads = []
    for node in inputs:
        value = node.meta["val"]
        if _loaded_once(value):
            loads.append(True)
        elif _same_shape(value, shape):
            loads.append(False)
        else:
            loads.append(broadcast_block(value, shape))
    return loads


def broadcast_sizes(shape, blocks) -> list[int]:
    """(inner, span) of each broadcast block (a, b) over a run of ``shape``."""
    sizes = []
    for a, b in blocks:
        sizes += [math.prod(shape[b:]), math.prod(shape[a:b])]
    return sizes


def _launcher(name: str, source: str, outputs: list[bool], dtype: torch.dtype,
              interpreted: bool, loads: list[Any]):
    """A function of the input tensors that allocates the outputs (True: of the
    run's shape, the inputs' broadcast one; False: a 0-dim result) and
    launches; ``loads`` says how each input is read (``_loads``)."""
    launch = load_module(write_source(name, source), interpreted).launch
    launch = without_cycles(launch) if interpreted else launch
    blocks = [load for load in loads if isinstance(load, tuple)]

    def run(*tensors, out=None):
        """``out``: a preallocated tensor (or None) per output (in-place updates)."""
        shape = torch.broadcast_shapes(*(t.shape for t in tensors))
        tensors = [_as_loaded(t, load is True, name) for t, load in zip(tensors, loads)]
        results = [given if given is not None else
                   torch.empty(shape if full else (), dtype=dtype, device=tensors[0].device)
                   for full, given in zip(outputs, out or [None] * len(outputs))]
        count = math.prod(shape)
        if count or not all(outputs):   # a sum of nothing is still written (0, or nan)
            block = max(16, min(1 << 16 if interpreted else 1024, 1 << (count - 1).bit_length()))
            with interpreter_mode(interpreted), numpy.errstate(all="ignore"):
                launch(block, count, *tensors, *results, *broadcast_sizes(shape, blocks))
        return tuple(results)
    run.__name__ = run.__qualname__ = name
    run.source, run.takes_out = source, True
    return run


def _as_loaded(tensor: torch.Tensor, scalar: bool, kernel: str) -> torch.Tensor:
    """The tensor as the kernel reads it: flat and contiguous, or (a broadcast
    value) with every stride 0, which the trace promised; anything else is
    refused rather than read out of bounds."""
    if not scalar:
        return tensor if tensor.is_contiguous() else tensor.contiguous()
    if any(tensor.stride()):
        raise RuntimeError(f"retrograd: size-generic kernel {kernel} was traced with a "
                           f"broadcast value (every stride 0) and got strides "
                           f"{tensor.stride()}")
    return tensor


#: Reductions over some dimensions that become size-generic kernels (the mean's flag).
_DIM_REDUCTIONS = {torch.ops.aten.sum.dim_IntList: False, torch.ops.aten.mean.dim: True}


def _reduced_side(node: fx.Node) -> tuple[bool, tuple[int, ...], bool] | None:
    """(leading?, reduced dims, keepdim) of a sum or mean over a leading or a
    trailing block of dimensions of a contiguous float input, else None."""
    if node.op != "call_function" or node.target not in _DIM_REDUCTIONS or node.kwargs \
            or len(node.args) not in (2, 3) or not isinstance(node.args[0], fx.Node):
        return None
    value, dims = node.args[0].meta.get("val"), node.args[1]
    if not isinstance(value, torch.Tensor) or value.dtype not in DTYPES or not value.dim() \
            or not _contiguous(value) or not isinstance(dims, (list, tuple, type(None))) \
            or node.meta["val"].dtype != value.dtype:
        return None
    dims = dims or range(value.dim())   # ``[]`` (a decomposed ``.sum()``): every dim
    reduced = tuple(sorted({d % value.dim() for d in dims}))
    keepdim = bool(node.args[2]) if len(node.args) == 3 else False
    if reduced == tuple(range(len(reduced))):
        return True, reduced, keepdim
    if reduced == tuple(range(value.dim() - len(reduced), value.dim())):
        return False, reduced, keepdim
    return None


def _reduction_launcher(node: fx.Node, leading: bool, reduced: tuple[int, ...],
                        keepdim: bool, interpreted: bool):
    """A function of the input that allocates the result and launches."""
    mean = _DIM_REDUCTIONS[node.target]
    digest = f"{int(leading)}{int(mean)}{str(node.meta['val'].dtype)[6:]}"
    name = f"sized_reduction_{digest}"
    source = reduction_source(name, leading, mean, node.meta["val"].dtype)
    launch = load_module(write_source(name, source), interpreted).launch
    launch = without_cycles(launch) if interpreted else launch

    def run(tensor, out=None):
        """``out``: a preallocated contiguous result (an arena slot), or None."""
        tensor = tensor if tensor.is_contiguous() else tensor.contiguous()
        shape, split = tensor.shape, len(reduced) if leading else tensor.dim() - len(reduced)
        rows, columns = math.prod(shape[:split]), math.prod(shape[split:])
        kept_shape = [1 if d in reduced else size for d, size in enumerate(shape)
                      if keepdim or d not in reduced]
        result = out if out is not None else \
            torch.empty(kept_shape, dtype=tensor.dtype, device=tensor.device)
        kept, count = (columns, rows) if leading else (rows, columns)
        if kept:
            widest = 1 << 16 if interpreted else 4096
            block_kept = max(16, min(1 << (kept - 1).bit_length(), 1024 if interpreted else 64))
            block_reduced = max(16, min(1 << max(count - 1, 1).bit_length(),
                                        widest // block_kept))
            with interpreter_mode(interpreted), numpy.errstate(all="ignore"):
                launch(block_kept, block_reduced, rows, columns, tensor, result)
        return result
    run.__name__ = run.__qualname__ = name
    run.source, run.writes_out = source, True   # ``out=`` as an aten op's (symbolic_plan)
    return run


def _replace_reductions(gm: fx.GraphModule, interpreted: bool) -> int:
    """Each sum or mean over leading or trailing dimensions becomes a kernel."""
    count = 0
    for node in list(gm.graph.nodes):
        side = _reduced_side(node)
        if side is None:
            continue
        launcher = _reduction_launcher(node, *side, interpreted)
        with gm.graph.inserting_after(node):
            call = gm.graph.call_function(launcher, (node.args[0],))
        call.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        count += 1
    return count


def kernel_sources(gm: fx.GraphModule) -> dict[str, str]:
    """The size-generic kernels ``gm`` launches: file name -> source (the dump's
    ``kernels/``)."""
    return {node.target.__name__: node.target.source for node in gm.graph.nodes
            if node.op == "call_function" and hasattr(node.target, "source")}


def fuse_pointwise(gm: fx.GraphModule, executor: str) -> tuple[fx.GraphModule, int]:
    """Replace runs of elementwise nodes, and sums or means over leading or
    trailing dimensions, by size-generic kernels;
    returns the module and how many kernels it launches. Only the Triton
    executors launch kernels; any other (fx, torch) leaves torch calls."""
    if executor not in ("triton", "interpret"):
        return gm, 0
    from retrograd.symbolic_rows import fuse_rows  # it imports this module's helpers
    rows = fuse_rows(gm, executor == "interpret")
    reductions = _replace_reductions(gm, executor == "interpret")
    runs = _runs(gm.graph)
    for run in runs:
        name, source, inputs, outputs = _source(run)
        value = run[0].meta["val"]
        shaped = [node.meta["val"].dim() == value.dim() for node in outputs]
        launcher = _launcher(name, source, shaped, value.dtype, executor == "interpret",
                             _loads(inputs, value.shape))
        with gm.graph.inserting_after(run[-1]):
            call = gm.graph.call_function(launcher, tuple(inputs))
        call.meta["val"] = tuple(node.meta["val"] for node in outputs)
        previous = call
        for index, node in enumerate(outputs):
            with gm.graph.inserting_after(previous):
                item = gm.graph.call_function(operator.getitem, (call, index))
            item.meta["val"] = node.meta["val"]
            node.replace_all_uses_with(item, delete_user_cb=lambda user, run=run: user not in run)
            previous = item
        for node in reversed(run):
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm, len(runs) + reductions + rows
