"""Scatter kernels written over the tensor they scatter into, where it dies there.

A scatter kernel (codegen/scatter.py) first makes its output equal to
``self`` and then writes or adds the source elements at their positions. When
``self`` is an extern op's result that nothing reads afterwards -- a tied
embedding's gradient: the fused linear + cross-entropy's ``grad_W``, then
``index_put(grad_W, [ids], rows, accumulate=True)`` from the embedding's
backward (passes/tied_gradients.py, cleanup's ``scatter_into_sums``) -- the
output can take ``self``'s storage: the copy then reads and writes each
element in place, and one ``V x width`` tensor less is alive. XLA's buffer
assignment shares a dynamic-update-slice's operand with its result the same
way.

Only outside the arenas: ``self`` must be a temporary the plan does not place
(an extern result without an ``out=`` form) and the output one with its own
storage (an escaping value), so no arena byte ever leaves the call. The
output is marked ``Buffer.reuses = self``, as buffer_reuse marks standalone
chains and donated updates; the wrapper then binds the output to ``self``'s
tensor.
"""

from __future__ import annotations

import torch

from retrograd.ir import Program

__all__ = ["donations", "SCATTER_TARGETS"]

aten = torch.ops.aten

SCATTER_TARGETS = {aten.index_put.default, aten.scatter.src, aten.scatter.value,
                   aten.scatter_add.default}


def _scatter(kernel):
    """The kernel's scatter node, if it is a generated scatter kernel with one output."""
    if kernel.kind != "triton" or len(kernel.outputs) != 1:
        return None
    return next((n for n in kernel.nodes if n.target in SCATTER_TARGETS
                 and n.name == kernel.outputs[0]), None)


def donations(program: Program, spans: dict[str, tuple[int, int]],
              planned: set[str]) -> dict[str, str]:
    """``{output: self}`` for each scatter kernel that may write over its ``self``."""
    escaping = program.escaping()
    found: dict[str, str] = {}
    for index, kernel in enumerate(program.kernels):
        node = _scatter(kernel)
        base = node.args[0] if node is not None else None
        if base is None or not hasattr(base, "name") or base.name not in program.buffers:
            continue
        out, source = program.buffers[kernel.outputs[0]], program.buffers[base.name]
        if (out.name not in escaping or out.name in planned or source.name in planned
                or source.role != "temporary" or source.name in escaping
                or source.name in program.inputs or source.name in found.values()
                or spans.get(source.name, (0, -1))[1] != index):
            continue
        if (out.shape, out.strides, out.dtype) != (source.shape, source.strides, source.dtype):
            continue
        if any(program.root(name) == source.name and name != source.name
               for name in kernel.inputs):
            continue   # a view of self is read too (the values or indices)
        found[out.name] = source.name
    return found
