"""Which fx nodes share a kernel: the greedy grouping fusion builds on.

Fusion (``passes/fusion.py``) walks the graph once and asks ``Grouping.place``
where each node goes: into the group of a producer it can read through a
register (vertical), into a group that already reads the same input
(horizontal), as a reduction with its prologue and epilogue, on its own
(scatter, pooling), or nowhere (an extern call or a view). It changes
nothing in the graph; fusion then builds the Program from the groups.

The invariants codegen relies on are kept here: every non-fill member of a
group has the group's element count (a reduction group: the full shape or
one row per output), every edge inside a group is same-shape or a row-major
reshape, a node never reads through memory what its own kernel writes, and
joining never closes a cycle between kernels (Inductor's ``can_fuse`` with
its cycle check, TorchInductor's scheduler).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from retrograd.ir import CodegenSupport
from retrograd.passes.op_classes import PHASE, is_reshape, view_base

__all__ = ["Grouping", "value_of", "numel_of", "tensor_args", "is_scan"]

#: The last item of a scan group's geometry: (full shape, (scanned dim,), SCAN).
SCAN = "scan"


def is_scan(geometry) -> bool:
    """A scan group's geometry: rows by the scanned extent, every member full."""
    return isinstance(geometry, tuple) and geometry[2:] == (SCAN,)


def value_of(node: Any):
    """The fake value fx recorded for ``node`` (None for a non-node)."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def numel_of(node: fx.Node) -> int | None:
    val = value_of(node)
    return val.numel() if isinstance(val, torch.Tensor) else None


def _nbytes(node: fx.Node) -> int:
    val = value_of(node)
    return val.numel() * val.element_size()


def tensor_args(node: fx.Node) -> list[fx.Node]:
    return [arg for arg in node.all_input_nodes if isinstance(value_of(arg), torch.Tensor)]


class Grouping:
    """The state of the greedy walk: which group each node joined.

    A group is pointwise (``geometry`` None: every member has the group's
    element count) or a reduction (``geometry`` = (full shape, reduced dims):
    members are *full*, with exactly the full shape, or *row*, with one
    element per row; ``numel`` is the row count).
    """

    def __init__(self, graph: fx.Graph, op_support: CodegenSupport):
        self.graph = graph
        self.support = op_support
        self.group_of: dict[fx.Node, int] = {}
        self.groups: list[list[fx.Node]] = []
        self.numel: list[int] = []
        self.geometry: list[tuple | None] = []
        self.ancestors: dict[fx.Node, frozenset[int]] = {}
        self.group_reads: list[set[int]] = []   # groups each group depends on directly
        self.phase: list[str | None] = []       # see ``PHASE``

    # -- reading values inside a group --------------------------------------
    def register_source(self, arg: fx.Node, group: int) -> fx.Node | None:
        """The in-group node whose register equals ``arg``, through reshapes."""
        start = arg
        while arg not in self.group_of and is_reshape(arg):
            arg = arg.args[0]
        if self.group_of.get(arg) != group or self.geometry[group] == "standalone":
            return None
        if self.geometry[group] is not None and arg is not start \
                and self.is_full(arg, group):
            return None   # full values are aligned by coordinates, not by reshapes
        return arg

    root = staticmethod(view_base)

    def is_full(self, node: fx.Node, group: int) -> bool:
        val = value_of(node)
        return (self.support.describe_reduction(node) is None
                and isinstance(val, torch.Tensor)
                and tuple(val.shape) == self.geometry[group][0])

    def row_aligned(self, arg: fx.Node, group: int) -> bool:
        """A row value read by a full node broadcasts along the reduced dims only."""
        full_shape, reduced = self.geometry[group]
        shape = tuple(value_of(arg).shape)
        if len(shape) != len(full_shape):
            return False
        return all((size == 1) if dim in reduced else (size == full_shape[dim])
                   for dim, size in enumerate(shape))

    # -- joining ---------------------------------------------------------------
    def external_ok(self, arg: fx.Node, group: int) -> bool:
        if self.group_of.get(self.root(arg)) == group:
            return False      # would read its own kernel's output through memory
        return group not in self.upstream(arg)   # else the kernel would depend on itself

    def upstream(self, arg: fx.Node) -> set[int]:
        """Every group ``arg`` depends on. A node's recorded ancestors go stale
        as groups grow (a group that later reads another group, by horizontal
        fusion say, brings that dependency to everything downstream of it), so
        they are closed over what each group reads now."""
        found = set(self.ancestors[arg])
        if arg in self.group_of:
            found.add(self.group_of[arg])
        work = list(found)
        while work:
            for group in self.group_reads[work.pop()] - found:
                found.add(group)
                work.append(group)
        return found

    def can_join(self, node: fx.Node, group: int) -> bool:
        if self.geometry[group] == "standalone":
            return False      # scatters and pools write memory only
        if self.phase[group] != node.meta.get(PHASE):
            return False
        if is_scan(self.geometry[group]):
            return self.can_join_scan(node, group)
        if self.geometry[group] is not None:
            return self.can_join_reduction(node, group)
        if self.numel[group] != numel_of(node):
            return False
        indexed = self.support.reads_by_index(node)   # its inputs must be in memory
        for arg in tensor_args(node):
            if self.support.is_fill(arg):
                continue
            if not indexed and self.register_source(arg, group) is not None:
                continue
            if not self.external_ok(arg, group):
                return False
        return True

    def can_join_reduction(self, node: fx.Node, group: int) -> bool:
        full = tuple(value_of(node).shape) == self.geometry[group][0]
        if self.support.reads_by_index(node) or self.support.is_generator(node):
            return False   # reduction kernels index by (row, column), not by offset
        if not full and numel_of(node) != self.numel[group]:
            return False
        for arg in tensor_args(node):
            if self.support.is_fill(arg):
                continue
            source = self.register_source(arg, group)
            if source is None:
                if not self.external_ok(arg, group):
                    return False
            elif full and not self.is_full(source, group) and not self.row_aligned(arg, group):
                return False
            elif not full and self.is_full(source, group):
                return False
        return True

    def can_join_scan(self, node: fx.Node, group: int) -> bool:
        """A pointwise node of the scanned shape (the scan's epilogue, or a
        value beside it), reading the group's values through registers."""
        if tuple(value_of(node).shape) != self.geometry[group][0] \
                or self.support.reads_by_index(node) or self.support.is_generator(node):
            return False   # scan kernels index by (row, position), not by offset
        return all(self.support.is_fill(arg) or self.register_source(arg, group) is not None
                   or self.external_ok(arg, group) for arg in tensor_args(node))

    def _convertible(self, group: int, shape: tuple) -> bool:
        """A pointwise group whose every member has ``shape``, reads a tensor,
        and is neither an indexed read nor a generator: one that can become a
        reduction's or a scan's prologue."""
        return self.geometry[group] is None and not any(
            tuple(value_of(m).shape) != shape or not tensor_args(m)
            or self.support.reads_by_index(m) or self.support.is_generator(m)
            for m in self.groups[group] if not self.support.is_fill(m))

    def place_scan(self, node: fx.Node) -> None:
        """A cumsum/cumprod takes the pointwise group computing its input as its
        prologue when that group can become a scan group (as a reduction takes
        its prologue), else starts a group of its own; pointwise consumers of
        the scanned shape join it later (its epilogue). One scan per group."""
        source, dim = node.args[0], node.args[1] % max(1, value_of(node).dim())
        shape = tuple(value_of(node).shape)
        geometry, rows = (shape, (dim,), SCAN), value_of(node).numel() // max(1, shape[dim])
        group = self.group_of.get(source)
        if group is not None and self.phase[group] == node.meta.get(PHASE) \
                and self._convertible(group, shape):
            self.geometry[group], self.numel[group] = geometry, rows
        else:
            group = None
        self.add(node, group, geometry, rows)

    def try_reduction(self, node: fx.Node) -> int | None:
        """The group a reduction joins (converting a pointwise group), if any."""
        source, dims, _ = self.support.describe_reduction(node)
        group = self.group_of.get(source)
        if group is None or self.geometry[group] == "standalone" \
                or self.phase[group] != node.meta.get(PHASE):
            return None
        full_shape = tuple(value_of(source).shape)
        geometry = (full_shape, tuple(dims))
        if self.geometry[group] is None:
            if not self._convertible(group, full_shape):
                return None   # a reshape or a generator inside: keep it pointwise
            self.geometry[group] = geometry
            self.numel[group] = numel_of(node) if not isinstance(value_of(node), tuple) \
                else value_of(node)[0].numel()
            return group
        if self.geometry[group] == geometry and self.is_full(source, group):
            return group
        return None

    def sibling_reduction(self, node: fx.Node, source: fx.Node, geometry) -> int | None:
        """A reduction group of the same geometry that already reads ``source``
        from memory (``x.sum(0)`` beside ``x.amax(0)``, a bias gradient beside
        a weight gradient's prologue): joining it reads the input once.
        Not for var_mean, whose value is a tuple of two rows."""
        if not isinstance(value_of(node), torch.Tensor):
            return None
        for user in source.users:
            group = self.group_of.get(user)
            if group is not None and self.geometry[group] == geometry \
                    and self.phase[group] == node.meta.get(PHASE) \
                    and self.can_join_reduction(node, group):
                return group
        return None

    def adopt_prologue(self, node: fx.Node, source: fx.Node, geometry) -> int | None:
        """Move ``source``, a pointwise value only ``node`` reads, out of a kernel
        of another geometry into ``node``'s reduction group, so it is computed
        where it is reduced instead of stored and read back; returns that group.

        Layer norm's weight gradient ``sum(grad * xhat, [0, 1])``: the product
        sits in the row kernel of the norm's backward; moved, it reads ``grad``
        as the bias gradient ``sum(grad, [0, 1])`` does, which then joins it as
        a sibling: one kernel for the two column sums (Inductor and Liger fuse
        them the same way). Only when at most one argument is a register of the
        old kernel, no larger than ``source``: that value is stored instead of
        ``source``, so no byte more is written.
        """
        group = self.group_of.get(source)
        support = self.support
        if group is None or self.geometry[group] in ("standalone", geometry) \
                or not isinstance(value_of(node), torch.Tensor) \
                or list(source.users) != [node] or len(self.groups[group]) < 2 \
                or self.phase[group] != node.meta.get(PHASE) \
                or support.describe_reduction(source) is not None or support.is_fill(source) \
                or not support.can_lower(source) or support.reads_by_index(source) \
                or support.is_generator(source):
            return None
        registers = [arg for arg in tensor_args(source) if not support.is_fill(arg)
                     and self.register_source(arg, group) is not None]
        if len(registers) > 1 or any(_nbytes(arg) > _nbytes(source) for arg in registers):
            return None
        target = next((g for arg in tensor_args(source) for user in arg.users
                       if (g := self.group_of.get(user)) is not None and g != group
                       and self.geometry[g] == geometry and self.phase[g] == self.phase[group]
                       and self.can_join_reduction(source, g)), None)
        self.groups[group].remove(source)
        self.add(source, target, geometry, value_of(node).numel())
        target = self.group_of[source]
        self.group_reads[target] |= self.ancestors[source] - {target}
        return target

    def add(self, node: fx.Node, group: int | None, geometry=None, numel=None) -> None:
        if group is None:
            group = len(self.groups)
            self.groups.append([])
            self.geometry.append(geometry)
            self.group_reads.append(set())
            self.numel.append(numel)
            self.phase.append(node.meta.get(PHASE))
        self.group_of[node] = group
        self.groups[group].append(node)

    def place(self, node: fx.Node) -> None:
        support = self.support
        if support.can_scatter(node):
            # one lane per element of the index (scatter) or values (index_put)
            self.add(node, None, "standalone", numel_of(node.args[2]))
        elif support.can_pool(node):
            self.add(node, None, "standalone", None)
        elif support.can_scan(node):
            self.place_scan(node)
        elif support.can_reduce(node):
            source, dims, _ = support.describe_reduction(node)
            val = value_of(node)
            rows = (val[0] if isinstance(val, (tuple, list)) else val).numel()
            geometry = (tuple(value_of(source).shape), tuple(dims))
            group = self.try_reduction(node)
            if group is None:
                group = self.adopt_prologue(node, source, geometry)
            self.add(node, self.sibling_reduction(node, source, geometry) if group is None
                     else group, geometry, rows)
        elif node.op == "call_function" and node.target is operator.getitem \
                and node.args[0] in self.group_of:
            self.add(node, self.group_of[node.args[0]])   # var_mean's (var, mean)
        elif support.can_lower(node) and not support.is_fill(node):
            candidates = []
            for arg in tensor_args(node):
                for group in self.groups_reachable_by_register(arg):
                    if group not in candidates:
                        candidates.append(group)
            # siblings: kernels already reading arg, so it is loaded once. Not for
            # a fill (a literal) or a single number (compile_step's learning
            # rate): one load saves nothing, and joining would hold every
            # parameter's gradient until the last of them is ready
            for arg in tensor_args(node):
                if support.is_fill(arg) or numel_of(arg) == 1:
                    continue
                for user in arg.users:
                    group = self.group_of.get(user)
                    if group is not None and group not in candidates:
                        candidates.append(group)
            joined = next((g for g in candidates if self.can_join(node, g)), None)
            self.add(node, joined, None, numel_of(node))
        inherited = set()
        for arg in node.all_input_nodes:
            inherited |= self.ancestors.get(arg, frozenset())
            if arg in self.group_of:
                inherited.add(self.group_of[arg])
        self.ancestors[node] = frozenset(inherited)
        if node in self.group_of:
            self.group_reads[self.group_of[node]] |= inherited - {self.group_of[node]}

    def groups_reachable_by_register(self, arg: fx.Node) -> list[int]:
        while arg not in self.group_of and is_reshape(arg):
            arg = arg.args[0]
        return [self.group_of[arg]] if arg in self.group_of else []
