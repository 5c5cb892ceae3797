"""The order a fused kernel's nodes run in as torch calls: least memory first.

A generated Triton kernel computes its nodes in registers, so their order in
the kernel is free; as torch calls (``torch_program.py``) each node is a
tensor, and the order decides how many are alive at once. GELU's forward
with its derivative (one kernel of the zoo's LoRA and GPT-2 models, 12
nodes over the MLP's hidden activation) holds four hidden-sized tensors in
fx's order and three when the derivative's chain runs first, so that the
last reader of the activation can write over it.

The search is exact over the kernel's topological orders, by memoized
recursion over the sets of nodes already run (a set determines what is
alive): the least possible peak of live bytes, counting values of this
program the kernel reads and is the last to read (they die inside it), and
crediting a pointwise op that may write over a same-sized operand dying at
it (``torch_liveness.py`` decides the real writes). Kernels whose sets
outrun ``BUDGET`` states keep fx's order, as does any kernel the search
cannot improve (ties keep fx's order node by node).
"""

from __future__ import annotations

from functools import cache

import torch
from retrograd.codegen.torch_liveness import _fresh
from torch import fx

__all__ = ["order_for_memory"]

#: states (sets of nodes run) searched per kernel before giving up
BUDGET = 5_000


class _TooWide(Exception):
    """The kernel has more orders than the search may look at."""


def _nbytes(node: fx.Node) -> int:
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return 0


def _made_by_program(node: fx.Node) -> bool:
    """``node``'s storage is the program's own (not an input's seen through views)."""
    while node.op == "call_function" and not _fresh(node):
        operands = node.all_input_nodes
        if len(operands) != 1:
            return False
        node = operands[0]
    return node.op == "call_function"


def _same_layout(a: fx.Node, b: fx.Node) -> bool:
    x, y = a.meta.get("val"), b.meta.get("val")
    return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and \
        x.shape == y.shape and x.dtype == y.dtype and x.stride() == y.stride()


def order_for_memory(nodes: list[fx.Node], aliases: dict[str, str], keep: set[str],
                     dying: set[str]) -> list[fx.Node]:
    """``nodes`` (a fused kernel's, in fx's order) in the order with the least
    peak of live bytes; ``aliases``: views read as the register they equal;
    ``keep``: names alive after the kernel; ``dying``: names of values read
    here that the plan frees after this kernel."""
    count = len(nodes)
    if count < 3 or count > 40:
        return nodes
    index = {node.name: i for i, node in enumerate(nodes)}
    operands, external, readers = _graph(nodes, aliases, index, dying)
    sizes = [_nbytes(node) for node in nodes]
    out_of_kernel = {name: _nbytes(node) for name, node in external.items()}
    alive_after = [node.name in keep for node in nodes]
    full = (1 << count) - 1
    states = [0]

    def live(done: int) -> int:
        total = sum(sizes[i] for i in range(count) if done >> i & 1 and
                    (alive_after[i] or readers[nodes[i].name] & ~done))
        return total + sum(size for name, size in out_of_kernel.items()
                           if readers[name] & ~done)

    def step(done: int, i: int) -> int:
        """Live bytes while node ``i`` runs after ``done``."""
        now = done | 1 << i
        credit = 0
        if torch.Tag.pointwise in getattr(nodes[i].target, "tags", ()):
            for name in operands[i]:
                operand = nodes[index[name]] if name in index else external.get(name)
                mine = name in index and not alive_after[index[name]]
                if operand is not None and (mine or name in external) and \
                        not readers[name] & ~now and _same_layout(operand, nodes[i]):
                    credit = max(credit, _nbytes(operand))
        return live(done) + sizes[i] - credit

    @cache
    def best(done: int) -> int:
        states[0] += 1
        if states[0] > BUDGET:
            raise _TooWide
        if done == full:
            return 0
        return min(max(step(done, i), best(done | 1 << i)) for i in _ready(done))

    def _ready(done: int):
        return [i for i in range(count) if not done >> i & 1 and
                all(done >> index[name] & 1 for name in operands[i] if name in index)]

    try:
        optimum = best(0)
    except _TooWide:
        return nodes
    fx_order = 0
    done = 0
    for i in range(count):
        fx_order = max(fx_order, step(done, i))
        done |= 1 << i
    if optimum >= fx_order:
        return nodes
    order, done = [], 0
    while done != full:
        i = next(i for i in _ready(done)
                 if max(step(done, i), best(done | 1 << i)) == best(done))
        order.append(nodes[i])
        done |= 1 << i
    return order


def _graph(nodes, aliases, index, dying):
    """Per node, the names it reads (views as their register); the dying
    values from outside the kernel; and per name, its readers as a bit set."""
    operands: list[list[str]] = []
    external: dict[str, fx.Node] = {}
    readers: dict[str, int] = {node.name: 0 for node in nodes}
    for i, node in enumerate(nodes):
        names = []
        for operand in node.all_input_nodes:
            name = aliases.get(operand.name, operand.name)
            names.append(name)
            if name not in index and operand.name in dying and _made_by_program(operand):
                external[name] = operand
            readers[name] = readers.get(name, 0) | 1 << i
        operands.append(names)
    return operands, external, readers
