"""Which planned strides the torch program follows: the layout pass's
channels-last choices, where every torch call that reads them copes.

The layout pass (``passes/layout.py``) gives the activations around CPU
convolutions channels-last strides, and tells a backward the strides its
saved activations arrive with. Generated kernels address every buffer through
its strides; the torch program (``torch_program.py``) instead runs the fx
nodes' own torch calls, which were traced against the recorded strides. It
used to keep those everywhere, so its convolutions read NCHW operands, and
oneDNN's ``convolution_backward`` took a larger scratch buffer for them
(the zoo's CNN peaked inside that call at 36,428 bytes, Inductor at 33,644).

A value's strides only matter to a torch call that reads them: a view
(``view``, ``as_strided`` and kin) reinterprets its operand's storage, so a
layout it was not traced with fails (``view``) or reads the wrong elements
(``as_strided``). Every other aten op computes from values, whatever the
strides, and gives its result some layout of its own (pointwise ops follow
their operands, convolutions their ``input``). So the torch program follows
a buffer's planned strides when no kernel that reads it is a view kernel or
contains such a view: no node of the kernel, since an operand's layout
flows into the kernel's inner values. Each kernel output still gets its
strides from ``_fix_layouts`` (a copy only where torch chose others), so a
value read by a view elsewhere is restored to the recorded strides first.

Where the plan's strides are not followed, the recorded ones are: a saved
activation the forward keeps NCHW for this reason arrives so in a backward
told channels-last, and is copied at entry -- right, only dearer.
"""

from __future__ import annotations

import torch
from retrograd.ir import Kernel, Kind, Program

__all__ = ["STRIDE_SENSITIVE", "followed_strides", "reads_strides"]

#: aten ops that reinterpret their operand's storage through its strides
STRIDE_SENSITIVE = frozenset({"view", "_unsafe_view", "as_strided", "as_strided_",
                              "as_strided_scatter", "_reshape_alias", "view_as_real",
                              "view_as_complex", "set_", "unfold"})


def reads_strides(kernel: Kernel) -> bool:
    """``kernel`` run as torch calls depends on its operands' strides: a view
    kernel, or a node whose op reinterprets storage (or is not an aten op we
    can vouch for)."""
    if kernel.kind == Kind.VIEW:
        return True
    for node in kernel.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            if target._opname in STRIDE_SENSITIVE:
                return True
        elif getattr(target, "__name__", "") != "getitem":
            return True
    return False


def followed_strides(program: Program) -> set[str]:
    """Names of the buffers whose planned strides the torch program gives its
    values: no kernel reading them depends on strides (``reads_strides``).
    For the others it keeps the recorded strides, as before."""
    readers: dict[str, list[Kernel]] = {}
    for kernel in program.kernels:
        for name in kernel.inputs:
            readers.setdefault(name, []).append(kernel)
    return {name for name, buffer in program.buffers.items()
            if buffer.role != "view"
            and not any(reads_strides(kernel) for kernel in readers.get(name, []))}
