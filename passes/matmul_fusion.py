"""Fuse a matmul with its pointwise prologue and epilogue into one template kernel.

What it does, on the program fusion built (every ``aten.mm`` an extern
call): for each 2-D ``mm`` (or ``addmm``, whose bias the template adds
itself) and each 3-D ``bmm`` (or ``baddbmm``: the batch is the template's
second grid dimension) it looks for
- an epilogue: the pointwise Triton kernel that reads the product (directly
  or through row-major reshapes of it) and iterates over exactly its
  elements -- a bias add, an activation, a residual add, a scale;
- a prologue: the pointwise Triton kernel whose only output is the left
  operand ``A`` (or the value ``A`` transposes or reshapes), read by this
  mm alone -- an activation's backward applied to the incoming gradient,
  ``mm(grad * gelu'(x), W)`` or ``mm((grad * gelu'(x))^T, x)``;
and, where either exists and the template is chosen, replaces the extern
call and those kernels by one kernel of family ``MATMUL``
(codegen/matmul_template.py): the prologue's value is computed tile by tile
and never stored; the product is stored only when something else reads it.

The choice (``matmul_templates``): False never; True always where a pattern
applies (so tests exercise the template under the interpreter); None
(default) asks ``ctx.op_support.choose_matmul`` on CUDA -- a bounded
autotune of a few block configurations against the extern call plus its
separate pointwise kernels, cached on disk with the kernels
(compiler/matmul_choice.py) -- and keeps the extern call on the CPU, where
the interpreter is no measure of speed. Every decision is in the stats
(``choices``: what was tried, what won, whether it came from the cache).

Not fused, with the reason in ``left_extern``: dtypes other than
float32/float16/bfloat16, symbolic sizes, a batch over 65535 products, a product whose other reader
feeds the epilogue (it would need the product before the epilogue's
kernel runs).

Requires: a Program from fusion (before layout, schedule and buffer_reuse).
Ensures: the program's values unchanged; each fused mm's kernel reads no
  value it writes; kernels in a topological order.
"""

from __future__ import annotations

import math

import torch

from retrograd.ir import Family, Kernel, Kind, PassResult, Program

__all__ = ["run"]

aten = torch.ops.aten

#: Dtypes the template computes (tl.dot with a float32 accumulator).
DTYPES = ("float32", "float16", "bfloat16")
#: The products fused: ``mm(A, B)``, ``addmm(bias, A, B)`` (inference keeps F.linear so),
#: and the batched ``bmm(A, B)``, ``baddbmm(bias, A, B)`` (with their product's rank).
RANKS = {"aten.mm.default": 2, "aten.addmm.default": 2, "aten.bmm.default": 3,
         "aten.baddbmm.default": 3}
MATMUL_OPS = tuple(RANKS)
#: Products a batched template computes at most: CUDA's limit on grid dimension 1.
MAX_BATCH = 65535
#: Views of the left operand the prologue can be read through.
OPERAND_VIEWS = (aten.permute.default, aten.view.default, aten._unsafe_view.default)


def _operands(node) -> tuple:
    """(A, B, bias or None) of an mm, addmm, bmm or baddbmm node."""
    if node.target in (aten.addmm.default, aten.baddbmm.default):
        return node.args[1], node.args[2], node.args[0]
    return node.args[0], node.args[1], None


def _contiguous(shape, strides) -> bool:
    expected, running = [], 1
    for size in reversed(shape):
        expected.append(running)
        running *= size
    return all(size == 1 or stride == want for size, stride, want
               in zip(shape, strides, reversed(expected)))


def _readers(program: Program, names: set[str]) -> list[Kernel]:
    return [k for k in program.kernels if set(k.inputs) & names]


def _views_of(program: Program, name: str) -> set[str]:
    return {b.name for b in program.buffers.values()
            if b.view_of is not None and program.root(b.name) == name}


def _eligible(kernel: Kernel, program: Program) -> str | None:
    """Why this extern kernel cannot be a template, or None."""
    node = kernel.nodes[0]
    value = node.meta.get("val")
    rank = RANKS[kernel.op]
    if not isinstance(value, torch.Tensor) or value.dim() != rank:
        return f"not a {rank}-D product"
    if rank == 3 and isinstance(value.shape[0], int) and value.shape[0] > MAX_BATCH:
        return f"a batch of {value.shape[0]} products (the grid's dimension 1 takes {MAX_BATCH})"
    if str(value.dtype).removeprefix("torch.") not in DTYPES:
        return f"dtype {value.dtype}"
    left, right, bias = _operands(node)
    sizes = [*value.shape, *left.meta["val"].shape]
    if not all(isinstance(size, int) for size in sizes):
        return "symbolic sizes"
    if any(arg.name not in program.buffers for arg in (left, right)):
        return "an operand is not a buffer"
    if bias is not None and not isinstance(bias, torch.fx.Node):
        return "a bias that is not a tensor"
    return None


def _permuted(program: Program, name: str, product: str) -> bool:
    """``name`` is the whole product in another order: the same elements, its
    strides a permutation of the contiguous ones (a transpose's copy, as
    attention's ``(weights @ v).transpose(1, 2).reshape(...)`` makes)."""
    view, buffer = program.buffers[name], program.buffers[product]
    if view.numel != buffer.numel or view.nbytes != buffer.nbytes:
        return False
    running = 1
    for stride, size in sorted(((st, sz) for sz, st in zip(view.shape, view.strides)
                                if sz != 1)):
        if stride != running:
            return False
        running *= size
    return True


def _reads_permuted(kernel: Kernel, names: set[str], program: Program, product: str) -> bool:
    """``kernel`` reads the product only through one permuted view, every
    node of it shaped as that view (so its iteration order is the view's)."""
    read = set(kernel.inputs) & names
    view = read.pop() if len(read) == 1 else product
    if view == product or not _permuted(program, view, product):
        return False
    shape = tuple(program.buffers[view].shape)
    return all(tuple(node.meta["val"].shape) == shape for node in kernel.nodes)


def _epilogue(program: Program, matmul: Kernel) -> tuple[Kernel | None, bool, set[str]]:
    """(the epilogue kernel or None, whether the product must still be
    stored, the views of the product the epilogue reads in registers).

    The epilogue reads the product directly or through row-major reshapes;
    or, read by nothing else, through one permuted view of it (the template
    then visits the epilogue's elements in the product's order)."""
    product = matmul.outputs[0]
    buffer = program.buffers[product]
    if not _contiguous(buffer.shape, buffer.strides):
        return None, True, set()
    views = _views_of(program, product)
    flat = {v for v in views if program.buffers[v].numel == buffer.numel
            and _contiguous(program.buffers[v].shape, program.buffers[v].strides)}
    names = {product} | views
    readers = [k for k in _readers(program, names) if k.kind != Kind.VIEW]
    pointwise = [k for k in readers if k.kind == Kind.TRITON
                 and k.family == Family.POINTWISE and k.numel == buffer.numel]
    chosen = next((k for k in pointwise if set(k.inputs) & names <= {product} | flat), None)
    if chosen is None:
        permuted = [k for k in pointwise if _reads_permuted(k, names, program, product)]
        if len(readers) == 1 and permuted and not program.escaping() & names:
            return permuted[0], False, set(permuted[0].inputs) & names
        return None, True, set()
    others = [k for k in readers if k is not chosen]
    stored = bool(others) or bool(program.escaping() & names)
    position = program.kernels.index(chosen)
    if any(program.kernels.index(k) < position for k in others):
        return None, True, set()   # another reader might feed the epilogue
    return chosen, stored, set(chosen.inputs) & flat


def _left_operand_view(program: Program, name: str) -> Kernel | None:
    """The view kernel making ``name`` if it is a transpose or reshape the
    template can read a prologue's value through."""
    view = next((k for k in program.kernels if k.kind == Kind.VIEW and name in k.outputs), None)
    node = view.nodes[0] if view is not None else None
    if node is None or node.target not in OPERAND_VIEWS or len(view.outputs) != 1:
        return None
    if node.target is aten.permute.default and list(node.args[1]) not in ([1, 0], [0, 2, 1]):
        return None   # only the last two dimensions swapped
    return view


def _reads_as_left_operand(kernel: Kernel, names: set[str]) -> bool:
    """An extern mm reading one of ``names`` as its left operand only."""
    if kernel.kind != Kind.EXTERN or kernel.op not in MATMUL_OPS:
        return False
    left, right, bias = (getattr(arg, "name", None) for arg in _operands(kernel.nodes[0]))
    return left in names and right not in names and bias not in names


def _prologue(program: Program, matmul: Kernel) -> tuple[Kernel | None, Kernel | None]:
    """(the kernel computing the left operand, the view kernel between) or Nones.

    The operand's value must be the one output of a pointwise kernel, read
    only as the left operand of mm's (each gets its own copy of the
    prologue; the kernel goes once none reads its value from memory)."""
    operand = matmul.nodes[0].args[0].name
    view, value = None, operand
    if program.buffers[operand].view_of is not None:
        view = _left_operand_view(program, operand)
        if view is None:
            return None, None
        value = view.nodes[0].args[0].name
        if program.buffers.get(value) is None or program.buffers[value].view_of is not None:
            return None, None
    producer = next((k for k in program.kernels if value in k.outputs), None)
    if producer is None or producer.kind != Kind.TRITON or producer.family != Family.POINTWISE \
            or producer.outputs != [value]:
        return None, None
    views = _views_of(program, value)
    if program.escaping() & ({value} | views):
        return None, None
    for reader in _readers(program, {value} | views):
        if reader.kind == Kind.VIEW:
            if _left_operand_view(program, reader.outputs[0]) is None or not all(
                    _reads_as_left_operand(k, set(reader.outputs))
                    for k in _readers(program, set(reader.outputs))):
                return None, None
        elif not _reads_as_left_operand(reader, {value} | views):
            return None, None
    return producer, view


def _merge(program: Program, matmul: Kernel, prologue, view, epilogue, stored: bool,
           flat_views: set[str], number: int) -> Kernel:
    """The template kernel covering the pieces (not yet placed in the program)."""
    nodes, inputs, aliases = [], [], {}
    if prologue is not None:
        nodes += prologue.nodes + ([view.nodes[0]] if view is not None else [])
        inputs += prologue.inputs
        aliases.update(prologue.aliases)
    left, right, bias = _operands(matmul.nodes[0])
    if prologue is None:
        inputs.append(left.name)
    nodes.append(matmul.nodes[0])
    inputs.append(right.name)
    if bias is not None:
        inputs.append(bias.name)
    product = matmul.outputs[0]
    outputs = [product] if stored else []
    if epilogue is not None:
        nodes += epilogue.nodes
        inputs += [n for n in epilogue.inputs if n != product and n not in flat_views]
        outputs += epilogue.outputs
        aliases.update(epilogue.aliases)
        aliases.update({name: product for name in flat_views})
    short = [getattr(n.target, "__name__", "").split(".")[0] for n in nodes]
    label = "_".join(dict.fromkeys(s for s in short if s and s != "getitem"))
    shape = program.buffers[product].shape if product in program.buffers else None
    return Kernel(name=f"matmul_{number}_{label[:40]}", kind=Kind.TRITON, family=Family.MATMUL,
                  nodes=nodes, inputs=list(dict.fromkeys(inputs)), outputs=outputs,
                  numel=math.prod(shape) if shape else 0, aliases=aliases)


def _apply(program: Program, matmul: Kernel, merged: Kernel, prologue, view, epilogue,
           stored: bool) -> None:
    """Put ``merged`` in place of the pieces; drop the kernels and buffers no
    longer read (a prologue read by another mm stays until that one is fused)."""
    anchor = epilogue if epilogue is not None else matmul
    program.kernels[program.kernels.index(anchor)] = merged
    gone = [matmul] if matmul is not anchor else []
    if epilogue is not None and not stored:
        product = matmul.outputs[0]
        views = _views_of(program, product)
        gone += [k for k in program.kernels if k.kind == Kind.VIEW and set(k.outputs) <= views]
        for name in {product} | views:
            program.buffers.pop(name, None)
    program.kernels = [k for k in program.kernels if all(k is not g for g in gone)]
    for kernel in ([view] if view is not None else []) + ([prologue] if prologue else []):
        if not _readers(program, set(kernel.outputs) | _views_of(program, kernel.outputs[0])):
            program.kernels = [k for k in program.kernels if k is not kernel]
            for name in kernel.outputs:
                program.buffers.pop(name, None)
    program.kernels = _topological(program.kernels)


def _topological(kernels: list[Kernel]) -> list[Kernel]:
    """Each kernel after its producers, else in the given order."""
    producer = {name: i for i, k in enumerate(kernels) for name in k.outputs}
    waiting = {i: {producer[n] for n in k.inputs if n in producer and producer[n] != i}
               for i, k in enumerate(kernels)}
    done, order = set(), []
    while len(order) < len(kernels):
        ready = next((i for i in range(len(kernels)) if i not in done and waiting[i] <= done),
                     None)
        if ready is None:
            raise RuntimeError("matmul_fusion: fusing made a cycle between kernels")
        done.add(ready)
        order.append(kernels[ready])
    return order


def _decide(ctx, merged: Kernel, pieces: list[Kernel], program: Program) -> tuple[bool, dict]:
    """Template or extern, and the record of why (with what was tried)."""
    record = {"kernel": merged.name, "nodes": [n.name for n in merged.nodes]}
    if ctx.options.matmul_templates is True:
        return True, {**record, "chosen": "template", "why": "matmul_templates=True"}
    choose = getattr(ctx.op_support, "choose_matmul", None)
    if choose is None:
        return False, {**record, "chosen": "extern", "why": "no autotune available"}
    use, config, tried = choose(merged, pieces, program.buffers)
    merged.tuning = config if use else None
    return use, {**record, "chosen": "template" if use else "extern", **tried}


def run(program: Program, ctx) -> PassResult:
    """Fuse each eligible mm with its prologue and epilogue where chosen."""
    stats = {"templates": 0, "choices": [], "left_extern": []}
    if ctx.options.matmul_templates is False:
        return PassResult(program, stats)
    number = 0
    for matmul in [k for k in program.kernels if k.kind == Kind.EXTERN
                   and k.op in MATMUL_OPS]:
        reason = _eligible(matmul, program)
        prologue, view = _prologue(program, matmul) if reason is None else (None, None)
        epilogue, stored, flat = _epilogue(program, matmul) if reason is None else (None, 1, ())
        if reason is None and prologue is None and epilogue is None:
            reason = "no pointwise prologue or epilogue to fuse"
        if reason is not None:
            stats["left_extern"].append(f"{matmul.nodes[0].name}: {reason}")
            continue
        merged = _merge(program, matmul, prologue, view, epilogue, stored, flat, number)
        pieces = [k for k in (prologue, matmul, epilogue) if k is not None]
        use, record = _decide(ctx, merged, pieces, program)
        stats["choices"].append(record)
        if use:
            _apply(program, matmul, merged, prologue, view, epilogue, stored)
            stats["templates"] += 1
            number += 1
    return PassResult(program, stats)
