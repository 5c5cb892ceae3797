"""Arena slots for the results of size-generic kernels (symbolic_fusion.py).

A size-generic kernel's launcher takes a preallocated tensor per output
(``out=``: its ``takes_out`` flag), so its results may live in the
run-time-sized arena (symbolic_plan.py) like the ``out=`` results of torch
calls: each result is the ``getitem`` of the kernel's call that names it,
made at the call, read until that item's last reader. As a pointwise torch
call may be written over its dying same-shape input, a kernel's output may
take the slot of one of its inputs that dies at the call: the kernel reads
and writes element ``i`` of a flat contiguous block in the same program
instance (every load before every store), so it never reads an element it
already wrote; a row-wise kernel (symbolic_rows.py) may walk a row several
times, but stores its full-shape outputs only in its last walk, after every
reduction read the row, and reads each element of that walk before writing
it. One input is taken by one output at most; an input seen at
other indices too (a broadcast value, a view of another input) is never
written over.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from retrograd.symbolic_fusion import _contiguous
from torch import fx

__all__ = ["kernel_item", "kernel_outputs", "kernel_written_over"]


def _is_kernel(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" \
        and getattr(node.target, "takes_out", False)


def kernel_item(node: fx.Node) -> bool:
    """An output of a size-generic kernel, contiguous: an arena slot."""
    value = node.meta.get("val")
    return node.op == "call_function" and node.target is operator.getitem \
        and _is_kernel(node.args[0]) and isinstance(value, torch.Tensor) \
        and _contiguous(value)


def kernel_written_over(node: fx.Node, last: dict, index: dict,
                        ancestry: Callable[[fx.Node], set], taken: set) -> str | None:
    """An input of ``node``'s kernel with its shape and dtype, contiguous, that
    dies at the call and is taken by no other output (added to ``taken``)."""
    call, value = node.args[0], node.meta["val"]
    if value.dim() == 0:   # a sum's result: written after every element is read
        return None
    inputs = call.all_input_nodes
    for arg in inputs:
        other = arg.meta.get("val")
        if (call, arg) in taken or not isinstance(other, torch.Tensor) or \
                last[arg] != index[call] or other.dtype != value.dtype or \
                not _contiguous(other) or \
                [str(s) for s in other.shape] != [str(s) for s in value.shape] or \
                any(a is not arg and arg in ancestry(a) for a in inputs):
            continue
        taken.add((call, arg))
        return arg.name
    return None


def kernel_outputs(nodes: list[fx.Node], planned) -> dict[str, list[str | None]]:
    """Kernel call name -> per output index, the planned item's name or None."""
    found: dict[str, list[str | None]] = {}
    for node in nodes:
        if node.name in planned and kernel_item(node):
            call, position = node.args
            names = found.setdefault(call.name, [None] * len(call.meta["val"]))
            names[position] = node.name
    return found
