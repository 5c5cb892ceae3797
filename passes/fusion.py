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
loaded once). Reductions and scans take their pointwise prologue and
epilogue. Which node joins which group is planned by
``planning/grouping.py``; this module builds the buffers and kernels from
that plan.

Requires: a functional ATen graph with fake values in node.meta['val'];
  ctx.op_support.
Ensures: a Program whose kernels cover every node once, in a topological
  order, each of one family; no kernel reads through memory a value it writes.
"""

from __future__ import annotations

import operator
from collections import Counter

import torch
import torch.fx as fx

from retrograd.ir import Buffer, Family, Kernel, Kind, PassResult, Program, Role
from retrograd.passes.op_classes import is_view
from retrograd.passes.planning.collectives import mark_after_waits
from retrograd.passes.planning.grouping import Grouping, is_scan, numel_of, tensor_args, value_of

__all__ = ["run"]

aten = torch.ops.aten


def _buffer(node: fx.Node, role: Role, view_of: str | None = None) -> Buffer:
    val = value_of(node)
    return Buffer(name=node.name, shape=tuple(val.shape), strides=tuple(val.stride()),
                  dtype=str(val.dtype).removeprefix("torch."), role=role, view_of=view_of)


class _Builder:
    """Turns a grouping into buffers and kernels."""

    def __init__(self, gm: fx.GraphModule, grouping: Grouping, name: str):
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
                grouping.add(node, None, None, numel_of(node))
        output_names = {arg.name for arg in self.outputs if isinstance(arg, fx.Node)}
        buffers: dict[str, Buffer] = {}
        inputs, constants, steps = [], {}, []
        emitted_groups: set[int] = set()
        for position, node in enumerate(self.gm.graph.nodes):
            if node.op == "placeholder":
                inputs.append(node.name)
                if isinstance(value_of(node), torch.Tensor):
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
            for arg in tensor_args(node):
                mode = self.read_mode(node, arg) if arg not in members else "register"
                if mode == "inline" and arg not in members and arg not in fills:
                    fills.append(arg)
                elif mode == "register" and arg not in members:
                    aliases[arg.name] = self.grouping.register_source(arg, group).name
                elif mode == "buffer" and arg.name not in inputs:
                    inputs.append(arg.name)
        # a tuple (var_mean) is never stored; its getitems are
        stored = [node for node in nodes if node in self.needed
                  and isinstance(value_of(node), torch.Tensor)]
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
        kind = "pointwise" if geometry is None else "scan" if is_scan(geometry) else "reduction"
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
            if support.can_scan(nodes[0]):
                return Family.SCAN
            return Family.SCATTER if support.can_scatter(nodes[0]) else Family.POOLING
        if is_scan(geometry):   # a cumsum/cumprod with its prologue and epilogue
            return Family.SCAN
        if geometry is not None:
            return Family.REDUCTION
        if any(support.reads_by_index(node) for node in nodes):
            return Family.INDEXING
        return Family.POINTWISE

    def extern_or_view(self, node: fx.Node, buffers, output_names) -> Kernel:
        view = is_view(node)
        val = value_of(node)
        members = [node]
        if isinstance(val, (tuple, list)):
            members += [user for user in node.users if user.target is operator.getitem]
            results = members[1:]
        else:
            results = [node]
        outputs = []
        for result in results:
            if not isinstance(value_of(result), torch.Tensor):
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
    mark_after_waits(gm.graph)   # a collective's result never joins the compute before it
    grouping = Grouping(gm.graph, ctx.op_support)
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
