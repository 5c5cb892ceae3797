"""Layout: channels-last activations around convolutions, on CPU.

What it does: gives the 4-D activations that convolutions read and write
channels-last strides (NHWC in memory), where nothing but generated kernels
and convolutions touch them. Generated kernels address every buffer through
its strides, so they write that layout directly and no copy is added.

Why: oneDNN, which runs torch's CPU convolutions, works in channels-last;
with NCHW operands it reorders them and its backward takes a far larger
scratch buffer (measured with torch 2.13 on the zoo's CNN: 27 KB against
23 KB for one convolution backward, 34 against 26 KB for another). The
peak of a training step is often reached inside that call. TorchInductor
makes the same choice for convolution graphs (its layout optimization).
On CUDA the pass does nothing until it is measured there.

Which buffers: a convolution's ``input`` (and, backward, ``grad_output``)
when it is a temporary written by a generated kernel -- or by a convolution
already made channels-last -- read only by generated kernels and
convolutions (a view would see the wrong strides); then the results torch
returns in that layout (forward output, backward ``grad_input`` and
``grad_weight``; torch follows ``input``) get the same strides where they are
such temporaries too, and ``rt.layout`` restores the planned strides of any
other result at run time.

Across the split (forward and backward programs): a convolution's input is
often saved for the backward, whose ``convolution_backward`` reads it again,
and that call is where a CNN's step peaks. A forward output the backward
receives (``ctx.num_fwd_outputs`` says which outputs are the user's; the rest
are saved) may be made channels-last like a temporary; the compiler hands the
backward the strides they arrive with (``saved_layouts`` ->
``ctx.input_layouts``), and the backward adopts them for an input read only
by generated kernels and convolutions (anything else would read a layout it
was not traced with; such an input keeps the traced strides, and the runtime
copies it at entry: correct, only dearer). Inductor does the same: AOTAutograd
restrides the backward's placeholders to the forward's output strides.

Requires: a fused Program (fusion).
Ensures: the same values; some temporaries and saved activations around
  convolutions in channels-last strides, restored where others read them.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from retrograd.ir import Buffer, Kernel, PassResult, Program
from retrograd.passes.op_classes import CONVOLUTIONS

__all__ = ["channels_last_strides", "run", "saved_layouts"]


def channels_last_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    n, c, h, w = shape
    return (h * w * c, 1, w * c, c)


def _readers(program: Program) -> dict[str, list[Kernel]]:
    readers: dict[str, list[Kernel]] = {}
    for kernel in program.kernels:
        for name in kernel.inputs:
            readers.setdefault(name, []).append(kernel)
    return readers


def _is_convolution(kernel: Kernel) -> bool:
    return kernel.kind == "extern" and kernel.op in CONVOLUTIONS


def saved_layouts(program: Program, user_outputs: int) -> dict[str, tuple[int, ...]]:
    """The strides of a forward program's saved activations, by name: its
    outputs past the first ``user_outputs`` that it computed itself (not its
    inputs, such as parameters, nor the user's outputs). The backward receives
    them, and nobody else holds them: it frees each at its last use."""
    held = set(program.inputs) | set(program.outputs[:user_outputs])
    return {name: program.buffers[name].strides for name in program.outputs[user_outputs:]
            if isinstance(name, str) and name in program.buffers and name not in held}


def _user_visible(program: Program, user_outputs: int | None) -> set[str]:
    """Buffers whose strides the caller sees: every escaping buffer, or with
    ``user_outputs`` known (a forward half) only the user's outputs and their
    storage; saved activations go to our own backward, which is told."""
    if user_outputs is None:
        return program.escaping()
    outputs = [name for name in program.outputs[:user_outputs] if isinstance(name, str)]
    return set(outputs) | {program.root(name) for name in outputs}


def _movable(program: Program, name: str, readers, producers, escaping, last) -> bool:
    """A temporary (or saved) 4-D activation not yet channels-last, written by a
    generated kernel or by a convolution torch lays out channels-last
    (``last``), whose every reader copes with any layout; ``escaping`` are the
    buffers whose strides the caller sees."""
    buffer: Buffer | None = program.buffers.get(name)
    if buffer is None or buffer.role not in ("temporary", "output") or len(buffer.shape) != 4 \
            or name in escaping or buffer.strides == channels_last_strides(buffer.shape):
        return False
    producer = producers.get(name)
    if producer is None or not (producer.kind == "triton" or name in last):
        return False
    return all(k.kind == "triton" or _is_convolution(k) for k in readers.get(name, []))


def _cpu(kernel: Kernel) -> bool:
    value = kernel.nodes[0].meta.get("val")
    value = value[0] if isinstance(value, (tuple, list)) else value
    return isinstance(value, torch.Tensor) and value.device.type == "cpu"


def _results(kernel: Kernel) -> list[str]:
    """The convolution's results torch lays out like ``input``."""
    head, *items = kernel.nodes
    if not items:
        return [head.name]
    return [item.name for item in items if item.target is operator.getitem
            and item.args[1] in (0, 1)]


def _adopt_input_layouts(program: Program, layouts: dict, readers) -> list[str]:
    """Give each program input the strides it arrives with (``layouts``, from
    the forward) where those differ from the traced ones and only generated
    kernels and convolutions read it. Returns the inputs changed."""
    adopted = []
    for name in program.inputs:
        buffer, strides = program.buffers.get(name), layouts.get(name)
        if buffer is None or strides is None or tuple(strides) == buffer.strides \
                or len(strides) != len(buffer.shape):
            continue
        if all(k.kind == "triton" or _is_convolution(k) for k in readers.get(name, [])):
            buffer.strides = tuple(strides)
            adopted.append(name)
    return adopted


def run(program: Program, ctx) -> PassResult:
    readers = _readers(program)
    producers = {name: kernel for kernel in program.kernels for name in kernel.outputs}
    adopted = _adopt_input_layouts(program, getattr(ctx, "input_layouts", {}), readers)
    escaping = _user_visible(program, getattr(ctx, "num_fwd_outputs", None))
    last: set[str] = set()        # convolution results torch returns channels-last
    changed: list[str] = [name for name in adopted
                          if program.buffers[name].strides
                          == channels_last_strides(program.buffers[name].shape)]
    convolutions = 0

    def movable(name: str) -> bool:
        return _movable(program, name, readers, producers, escaping, last)

    for kernel in program.kernels:
        if not _is_convolution(kernel) or not _cpu(kernel):
            continue
        head = kernel.nodes[0]
        backward = kernel.op == "aten.convolution_backward.default"
        source = head.args[1 if backward else 0]
        if not isinstance(source, fx.Node) or source.name not in changed \
                and not movable(source.name):
            continue
        convolutions += 1
        last |= set(_results(kernel))
        moved = [source.name] + ([head.args[0].name] if backward else []) + _results(kernel)
        for name in moved:
            if name not in changed and movable(name):
                buffer = program.buffers[name]
                buffer.strides = channels_last_strides(buffer.shape)
                changed.append(name)
    moved = [name for name in changed if name not in adopted]
    return PassResult(program, {"convolutions": convolutions,
                                "channels_last_buffers": len(moved), "buffers": moved,
                                "inputs_in_forward_layout": adopted})
