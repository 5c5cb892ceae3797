"""Group pointwise nodes into kernels and build the program IR.

What it does: walks the fx graph in topological order and puts each node
that codegen can lower (``ctx.op_support.can_lower``) into a group with one
of its producers when the two share an iteration order; every other node
becomes an extern call of its aten op, and aliasing ops (view, permute,
expand, slice, ...) become views that move no data. The result is a
``Program``: buffers plus kernels in a topological order.

Invariants it keeps, which codegen relies on:
- all non-fill nodes of a group have the same element count, and every edge
  inside a group is either same-shape or a row-major reshape (view, squeeze,
  unsqueeze, ...), so "element i" means the same thing for every node and an
  in-kernel value is one register per element;
- a node never reads, through memory, a value its own kernel writes (that
  would race across programs);
- grouping never creates a cycle between kernels (a node joins a group only
  if none of its other inputs depends on that group);
- constant fills (``full``, ``zeros_like``, ``scalar_tensor``, ...) are
  inlined as literals into every kernel that reads them and materialized
  only when something other than a kernel needs them.

This is greedy fusion in the manner of TorchInductor's scheduler
(``can_fuse`` over producer/consumer pairs, with the same cycle check):
vertical (a consumer joins its producer's kernel) first, then horizontal
(a node joins a kernel that already reads the same input, so the input is
loaded once). Reductions take their pointwise prologue and epilogue.

Requires: a functional ATen graph with fake values in node.meta['val'];
  ctx.op_support.
Ensures: a Program whose kernels cover every node once, in a topological
  order, each of one family; no kernel reads through memory a value it writes.
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import Any

import torch
import torch.fx as fx

from retrograd.ir import Buffer, Family, Kernel, Kind, PassResult, Program, Role
from retrograd.passes.op_classes import PHASE, is_reshape, is_view, view_base

__all__ = ["run", "is_view", "is_reshape", "PHASE"]

aten = torch.ops.aten


def _val(node: Any):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _numel(node: fx.Node) -> int | None:
    val = _val(node)
    return val.numel() if isinstance(val, torch.Tensor) else None


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [arg for arg in node.all_input_nodes if isinstance(_val(arg), torch.Tensor)]


class _Grouping:
    """The state of the greedy walk: which group each node joined.

    A group is pointwise (``geometry`` None: every member has the group's
    element count) or a reduction (``geometry`` = (full shape, reduced dims):
    members are *full*, with exactly the full shape, or *row*, with one
    element per row; ``numel`` is the row count).
    """

    def __init__(self, graph: fx.Graph, op_support):
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
        val = _val(node)
        return (self.support.describe_reduction(node) is None
                and isinstance(val, torch.Tensor)
                and tuple(val.shape) == self.geometry[group][0])

    def row_aligned(self, arg: fx.Node, group: int) -> bool:
        """A row value read by a full node broadcasts along the reduced dims only."""
        full_shape, reduced = self.geometry[group]
        shape = tuple(_val(arg).shape)
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
        if self.geometry[group] is not None:
            return self.can_join_reduction(node, group)
        if self.numel[group] != _numel(node):
            return False
        indexed = self.support.reads_by_index(node)   # its inputs must be in memory
        for arg in _tensor_args(node):
            if self.support.is_fill(arg):
                continue
            if not indexed and self.register_source(arg, group) is not None:
                continue
            if not self.external_ok(arg, group):
                return False
        return True

    def can_join_reduction(self, node: fx.Node, group: int) -> bool:
        full = tuple(_val(node).shape) == self.geometry[group][0]
        if self.support.reads_by_index(node) or self.support.is_generator(node):
            return False   # reduction kernels index by (row, column), not by offset
        if not full and _numel(node) != self.numel[group]:
            return False
        for arg in _tensor_args(node):
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

    def try_reduction(self, node: fx.Node) -> int | None:
        """The group a reduction joins (converting a pointwise group), if any."""
        source, dims, _ = self.support.describe_reduction(node)
        group = self.group_of.get(source)
        if group is None or self.geometry[group] == "standalone" \
                or self.phase[group] != node.meta.get(PHASE):
            return None
        full_shape = tuple(_val(source).shape)
        geometry = (full_shape, tuple(dims))
        if self.geometry[group] is None:
            members = self.groups[group]
            if any(tuple(_val(m).shape) != full_shape or not _tensor_args(m)
                   or self.support.reads_by_index(m) or self.support.is_generator(m)
                   for m in members if not self.support.is_fill(m)):
                return None   # a reshape or a generator inside: keep it pointwise
            self.geometry[group] = geometry
            self.numel[group] = _numel(node) if not isinstance(_val(node), tuple) \
                else _val(node)[0].numel()
            return group
        if self.geometry[group] == geometry and self.is_full(source, group):
            return group
        return None

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
            self.add(node, None, "standalone", _numel(node.args[2]))
        elif support.can_pool(node):
            self.add(node, None, "standalone", None)
        elif support.can_reduce(node):
            source, dims, _ = support.describe_reduction(node)
            val = _val(node)
            rows = (val[0] if isinstance(val, (tuple, list)) else val).numel()
            self.add(node, self.try_reduction(node), (tuple(_val(source).shape), tuple(dims)),
                     rows)
        elif node.op == "call_function" and node.target is operator.getitem \
                and node.args[0] in self.group_of:
            self.add(node, self.group_of[node.args[0]])   # var_mean's (var, mean)
        elif support.can_lower(node) and not support.is_fill(node):
            candidates = []
            for arg in _tensor_args(node):
                for group in self.groups_reachable_by_register(arg):
                    if group not in candidates:
                        candidates.append(group)
            # siblings: kernels already reading arg, so it is loaded once. Not for
            # a fill (a literal) or a single number (compile_step's learning
            # rate): one load saves nothing, and joining would hold every
            # parameter's gradient until the last of them is ready
            for arg in _tensor_args(node):
                if support.is_fill(arg) or _numel(arg) == 1:
                    continue
                for user in arg.users:
                    group = self.group_of.get(user)
                    if group is not None and group not in candidates:
                        candidates.append(group)
            joined = next((g for g in candidates if self.can_join(node, g)), None)
            self.add(node, joined, None, _numel(node))
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


def _buffer(node: fx.Node, role: Role, view_of: str | None = None) -> Buffer:
    val = _val(node)
    return Buffer(name=node.name, shape=tuple(val.shape), strides=tuple(val.stride()),
                  dtype=str(val.dtype).removeprefix("torch."), role=role, view_of=view_of)


class _Builder:
    """Turns a grouping into buffers and kernels."""

    def __init__(self, gm: fx.GraphModule, grouping: _Grouping, name: str):
        self.gm = gm
        self.grouping = grouping
        self.name = name
        self.output_node = next(n for n in gm.graph.nodes if n.op == "output")
        self.outputs = list(self.output_node.args[0])
        self.needed: set[fx.Node] = set()

    # -- which values must exist as tensors at run time -------------------
    def read_mode(self, consumer: fx.Node, arg: fx.Node) -> str:
        """How ``consumer`` reads ``arg``: "inline" (a fill's literal), "register",
        "buffer", or "shape" (a lowered fill such as ``full_like(x)`` uses only
        x's shape, so x need not exist in memory for it)."""
        support = self.grouping.support
        if support.reads_shape_only(consumer, arg) and support.can_lower(consumer):
            return "shape"
        group = self.grouping.group_of.get(consumer)
        if group is None:
            return "buffer"
        if self.grouping.support.is_fill(arg):
            return "inline"
        if self.grouping.register_source(arg, group) is not None:
            return "register"
        return "buffer"

    def find_needed(self) -> None:
        """Values that must exist in memory: outputs, what is read as a buffer,
        and the bases of needed views. A view outside any kernel does not by
        itself make its base needed: only if the view is needed (a kernel
        reading it through a register leaves the base in registers too)."""
        work = [arg for arg in self.outputs if isinstance(arg, fx.Node)]
        for node in self.gm.graph.nodes:
            if node.op != "call_function":
                continue
            if is_view(node) and node not in self.grouping.group_of:
                continue
            for arg in node.all_input_nodes:
                if self.read_mode(node, arg) == "buffer":
                    work.append(arg)
        while work:
            node = work.pop()
            if node in self.needed:
                continue
            self.needed.add(node)
            if is_view(node) or node.target is operator.getitem:
                work.append(node.args[0])

    # -- buffers and kernels ------------------------------------------------
    def build(self) -> Program:
        self.find_needed()
        grouping = self.grouping
        # A fill needed as a tensor gets a kernel of its own.
        for node in self.gm.graph.nodes:
            if node in self.needed and grouping.support.is_fill(node) \
                    and grouping.support.can_lower(node):
                grouping.add(node, None, None, _numel(node))
        output_names = {arg.name for arg in self.outputs if isinstance(arg, fx.Node)}
        buffers: dict[str, Buffer] = {}
        inputs, constants, steps = [], {}, []
        emitted_groups: set[int] = set()
        for position, node in enumerate(self.gm.graph.nodes):
            if node.op == "placeholder":
                inputs.append(node.name)
                if isinstance(_val(node), torch.Tensor):
                    buffers[node.name] = _buffer(node, Role.INPUT)
            elif node.op == "get_attr":
                constants[node.name] = getattr(self.gm, node.target)
                if isinstance(constants[node.name], torch.Tensor):
                    buffers[node.name] = Buffer(
                        node.name, tuple(constants[node.name].shape),
                        tuple(constants[node.name].stride()),
                        str(constants[node.name].dtype).removeprefix("torch."), "constant")
            elif node.op == "call_function" and node in grouping.group_of:
                group = grouping.group_of[node]
                if group not in emitted_groups:
                    emitted_groups.add(group)
                    steps.append((position, self.triton_kernel(group, buffers, output_names)))
            elif node.op == "call_function" and node.target is operator.getitem:
                continue   # part of the kernel that made the tuple
            elif node.op == "call_function" and grouping.support.is_fill(node) \
                    and node not in self.needed:
                continue   # inlined as a literal wherever it is read
            elif node.op == "call_function" and (node in self.needed or not is_view(node)):
                steps.append((position, self.extern_or_view(node, buffers, output_names)))
        kernels = _topological([kernel for _, kernel in steps])
        program = Program(name=self.name, buffers=buffers, kernels=kernels, inputs=inputs,
                          outputs=[arg.name if isinstance(arg, fx.Node) else arg
                                   for arg in self.outputs],
                          constants=constants)
        return program

    def triton_kernel(self, group: int, buffers, output_names) -> Kernel:
        nodes = self.grouping.groups[group]
        members = set(nodes)
        inputs, fills, aliases = [], [], {}
        for node in nodes:
            for arg in _tensor_args(node):
                mode = self.read_mode(node, arg) if arg not in members else "register"
                if mode == "inline" and arg not in members and arg not in fills:
                    fills.append(arg)
                elif mode == "register" and arg not in members:
                    aliases[arg.name] = self.grouping.register_source(arg, group).name
                elif mode == "buffer" and arg.name not in inputs:
                    inputs.append(arg.name)
        # a tuple (var_mean) is never stored; its getitems are
        stored = [node for node in nodes if node in self.needed
                  and isinstance(_val(node), torch.Tensor)]
        outputs = [node.name for node in stored]
        for node in stored:
            buffers[node.name] = _buffer(
                node, Role.OUTPUT if node.name in output_names else Role.TEMPORARY)
        ops = []
        for node in nodes:
            short = getattr(node.target, "__name__", str(node.target)).split(".")[0]
            if short not in ops and short != "getitem":
                ops.append(short)
        geometry = self.grouping.geometry[group]
        kind = "pointwise" if geometry is None else "reduction"
        family = self._family(nodes, geometry)
        if geometry == "standalone":   # a kernel of its own kind: scatter, pooling
            kind = nodes[0].target.__name__.split(".")[0]
            geometry = None
        return Kernel(name=f"{kind}_{group}_{'_'.join(ops[:3])}", kind=Kind.TRITON,
                      nodes=fills + nodes, inputs=inputs, outputs=outputs,
                      numel=self.grouping.numel[group], aliases=aliases,
                      full_shape=geometry[0] if geometry else None,
                      reduced_dims=geometry[1] if geometry else None, family=family)

    def _family(self, nodes: list[fx.Node], geometry) -> Family:
        """What the kernel computes, which picks its code generator."""
        support = self.grouping.support
        if geometry == "standalone":
            return Family.SCATTER if support.can_scatter(nodes[0]) else Family.POOLING
        if geometry is not None:
            return Family.REDUCTION
        if any(support.reads_by_index(node) for node in nodes):
            return Family.INDEXING
        return Family.POINTWISE

    def extern_or_view(self, node: fx.Node, buffers, output_names) -> Kernel:
        view = is_view(node)
        val = _val(node)
        members = [node]
        if isinstance(val, (tuple, list)):
            members += [user for user in node.users if user.target is operator.getitem]
            results = members[1:]
        else:
            results = [node]
        outputs = []
        for result in results:
            if not isinstance(_val(result), torch.Tensor):
                continue
            if view:
                # a getitem of a multi-output view (split) aliases the split's base
                source = result.args[0] if result.target is operator.getitem else result
                base = self.grouping.root(source)
                buffers[result.name] = _buffer(result, Role.VIEW, view_of=base.name)
            else:
                role = Role.OUTPUT if result.name in output_names else Role.TEMPORARY
                buffers[result.name] = _buffer(result, role)
            outputs.append(result.name)
        inputs = [arg.name for arg in node.all_input_nodes if arg.name in buffers]
        short = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        prefix = "view" if view else "extern"
        return Kernel(name=f"{prefix}_{node.name}" if view else f"{prefix}_{short}_{node.name}",
                      kind=Kind.VIEW if view else Kind.EXTERN, nodes=members,
                      inputs=inputs, outputs=outputs)


def _topological(kernels: list[Kernel]) -> list[Kernel]:
    """Order kernels so each runs after its producers, else keeping graph order."""
    producer = {name: index for index, kernel in enumerate(kernels) for name in kernel.outputs}
    waiting = {index: {producer[name] for name in kernel.inputs
                       if name in producer and producer[name] != index}
               for index, kernel in enumerate(kernels)}
    done, order = set(), []
    while len(order) < len(kernels):
        ready = [index for index in range(len(kernels))
                 if index not in done and waiting[index] <= done]
        if not ready:
            raise RuntimeError("fusion produced a cycle between kernels")
        done.add(ready[0])
        order.append(kernels[ready[0]])
    return order


def _is_pointwise_op(node: fx.Node) -> bool:
    """ATen's own classification (``Tag.pointwise``), independent of codegen."""
    return node.op == "call_function" and torch.Tag.pointwise in getattr(node.target, "tags", ())


def run(gm: fx.GraphModule, ctx) -> PassResult:
    """Fuse ``gm`` into a Program; stats count kernels and the ops they cover.
    ``ctx.updates`` (compile_step: output position -> input position it is the
    next value of) becomes ``program.updates`` by buffer name."""
    for node in gm.graph.nodes:   # constants carry real tensors as their value
        if node.op == "get_attr" and "val" not in node.meta:
            node.meta["val"] = getattr(gm, node.target)
    grouping = _Grouping(gm.graph, ctx.op_support)
    for node in gm.graph.nodes:
        grouping.place(node)
    program = _Builder(gm, grouping, ctx.graph_name).build()
    program.updates = {program.outputs[out]: program.inputs[into]
                       for out, into in ctx.updates.items()
                       if isinstance(program.outputs[out], str)}
    pointwise = [n for n in gm.graph.nodes if _is_pointwise_op(n)]
    in_triton = {n for k in program.kernels_of("triton") for n in k.nodes}
    extern_ops = Counter(k.op for k in program.kernels_of("extern"))
    stats = {
        "triton_kernels": len(program.kernels_of("triton")),
        "extern_kernels": len(program.kernels_of("extern")),
        "views": len(program.kernels_of("view")),
        "pointwise_ops": len(pointwise),
        "pointwise_ops_in_triton": len([n for n in pointwise if n in in_triton]),
        "ops_in_triton": len({n for n in in_triton if n.op == "call_function"
                              and n.target is not operator.getitem}),
        "pointwise_ops_extern": dict(sorted(Counter(
            str(n.target) for n in pointwise if n not in in_triton).items())),
        "extern_ops": dict(sorted(extern_ops.items())),
    }
    return PassResult(program, stats)
