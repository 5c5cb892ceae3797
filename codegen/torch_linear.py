"""Transposes in the torch program: ``F.linear(x, w, b)``, not ``permute`` + ``mm``.

AOTAutograd's graph spells ``F.linear(x, w, b)`` on a 2-D ``x`` as two nodes,
``permute(w, [1, 0])`` (its own view kernel) and ``addmm(b, x, permute)``
(``mm(x, permute)`` without a bias). Written one per line, the torch
program paid a Python call, an assignment and a delete for the transpose
that eager's ``F.linear`` makes in C++ (``weight.t()``): 56 permutes in
lora's backward program, 36 in its forward, one per matrix product.

``at::linear`` on a 2-D input calls ``at::addmm(bias, input, weight.t())``
with a bias and ``at::matmul(input, weight.t())`` (a 2-D by 2-D matmul is
``at::mm``) without one: the same aten op on operands of the same strides
as the graph's pair, so the same numbers bit for bit
(``tests/test_torch_linear.py`` checks the written program against the
unfolded one with ``torch.equal``). The pair is folded only where nothing
else reads the transpose (no other node, not an output of the program) and
the plan writes the product into no donated input (``out=`` needs the
``torch.addmm`` call form, ``torch_liveness.py``); the writer then keeps
the weight alive until the product (``torch_program.py``: a delete the plan
put after the transpose waits for it), which is how long the transpose, a
view of the weight, held its storage before.

The backward spells a weight's gradient's transposes as chains,
``permute(permute(permute(g, [1, 0]), [1, 0]), [1, 0])``: a permute read only
by permutes is not written either; its readers permute its base by the
composed dims (one call, the same view: ``torch.permute`` of a permute is a
permute of the base).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from retrograd.ir import Kind, Program
from torch import fx

__all__ = ["Folds", "fold_transposes"]

aten = torch.ops.aten


@dataclass
class Folds:
    """Permutes the program does not write: ``chained`` (read only by other
    permutes) and ``linear`` (written inside ``F.linear``), and how many
    written statements read each one's base through them (``reads``)."""

    chained: set[str] = field(default_factory=set)
    linear: set[str] = field(default_factory=set)
    reads: dict[str, int] = field(default_factory=dict)   # base -> readers not yet written
    deferred: set[str] = field(default_factory=set)   # plan deletes waiting for them

    def hold(self, names) -> list[str]:
        """Of the plan's deletes ``names``, those that may happen now; a base
        still read through a permute not written waits for that reader."""
        waits = {name for name in names if self.reads.get(name, 0) > 0}
        self.deferred |= waits
        return [name for name in names if name not in waits]

    def written(self, node: fx.Node) -> list[str]:
        """``node`` was written: the deletes that waited for it and may happen now."""
        ready = []
        for operand in node.all_input_nodes:
            if self.hidden(operand.name):
                base = self.resolve(operand)[0].name
                self.reads[base] -= 1
                if self.reads[base] <= 0 and base in self.deferred:
                    self.deferred.discard(base)
                    ready.append(base)
        return ready

    def release(self) -> list[str]:
        """Every delete still waiting (at the program's end)."""
        self.reads.clear()
        ready, self.deferred = sorted(self.deferred), set()
        return ready

    def hidden(self, name: str) -> bool:
        return name in self.chained or name in self.linear

    def resolve(self, node: fx.Node) -> tuple[fx.Node, list[int]]:
        """``permute(x, dims)`` equal to the permute ``node`` (``x`` not chained)."""
        base, dims = node.args[0], list(node.args[1])
        while isinstance(base, fx.Node) and base.name in self.chained:
            dims = [list(base.args[1])[d] for d in dims]
            base = base.args[0]
        return base, dims

    def permute_call(self, node: fx.Node, render) -> str | None:
        """A permute of a chained permute: one ``torch.permute`` of the base."""
        if node.target is not aten.permute.default or not isinstance(node.args[0], fx.Node) \
                or node.args[0].name not in self.chained:
            return None
        base, dims = self.resolve(node)
        return f"torch.permute({render(base)}, {dims})"

    def linear_call(self, reader: fx.Node, render) -> str | None:
        """``torch.nn.functional.linear(x, w[, b])`` for a product whose
        transpose was folded, else None; ``render`` writes an operand."""
        operands = _linear_operands(reader, self)
        if operands is None or operands[1].name not in self.linear:
            return None
        x, transpose, bias = operands
        weight = render(self.resolve(transpose)[0])
        pieces = [render(x), weight] + ([] if bias is None else [render(bias)])
        return f"torch.nn.functional.linear({', '.join(pieces)})"


def _value(node) -> torch.Tensor | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _transpose(node, folds: Folds) -> bool:
    """``node`` is a permute equal to ``permute(w, [1, 0])`` of a 2-D ``w``."""
    if not isinstance(node, fx.Node) or node.target is not aten.permute.default:
        return False
    base, dims = folds.resolve(node)
    return _value(base) is not None and _value(base).dim() == 2 and dims == [1, 0]


def _linear_operands(reader: fx.Node, folds: Folds):
    """``(x, transpose, bias or None)`` when ``reader`` is ``mm(x, w.T)`` or
    ``addmm(b, x, w.T)`` with ``beta = alpha = 1`` that ``at::linear`` makes:
    2-D ``x``, a 1-D bias of the output's width, one dtype; else None."""
    if reader.kwargs:
        return None
    if reader.target is aten.mm.default and len(reader.args) == 2:
        (x, transpose), bias = reader.args, None
    elif reader.target is aten.addmm.default and len(reader.args) == 3:
        bias, x, transpose = reader.args
    else:
        return None
    if not _transpose(transpose, folds) or x is transpose or bias is transpose:
        return None
    values = [_value(x), _value(transpose), _value(reader)]
    if bias is not None:
        values.append(_value(bias))
    if any(value is None for value in values) or values[0].dim() != 2 or \
            len({value.dtype for value in values}) != 1:
        return None
    if bias is not None and tuple(values[3].shape) != (values[2].shape[1],):
        return None
    return x, transpose, bias


def _candidates(program: Program) -> list[fx.Node]:
    """Permutes alone in a view kernel, read by some node, not an output."""
    outputs = {name for name in program.outputs if isinstance(name, str)}
    found = []
    for kernel in program.kernels:
        if kernel.kind == Kind.VIEW and len(kernel.nodes) == 1:
            node = kernel.nodes[0]
            if node.target is aten.permute.default and isinstance(node.args[0], fx.Node) \
                    and node.users and node.name not in outputs:
                found.append(node)
    return found


def fold_transposes(program: Program, donor) -> Folds:
    """The permutes of ``program`` its torch program does not write.
    ``donor(node)``: the input the plan writes ``node`` over, if any (those
    products keep the ``torch.addmm`` call form, its ``out=``)."""
    folds = Folds()
    candidates = _candidates(program)
    for node in candidates:
        if all(user.target is aten.permute.default for user in node.users):
            folds.chained.add(node.name)
    for node in candidates:
        if node.name not in folds.chained and all(
                _linear_operands(user, folds) is not None and
                _linear_operands(user, folds)[1] is node and donor(user) is None
                for user in node.users):
            folds.linear.add(node.name)
    for node in candidates:
        if folds.hidden(node.name):
            base = folds.resolve(node)[0].name
            written = [user for user in node.users if not folds.hidden(user.name)]
            folds.reads[base] = folds.reads.get(base, 0) + len(written)
    return folds
