"""Online softmax: the max and the sum of exponentials in one walk over a long row.

In a looped reduction kernel (the extent does not fit one block) softmax,
log-softmax and cross-entropy walk the row three times: the max, then
``sum(exp(x - max))``, then the store. Milakov and Gimelshein's online
normalizer (2018) folds the first two into one walk: each lane keeps its
running max ``m`` and a running sum ``s`` of ``exp(x - m)``, rescaled by
``exp(m_old - m_new)`` whenever the max grows. After the walk the lanes
combine as ``S = sum(s * exp(m - M))`` with ``M`` the row's max. The row
is then read twice instead of three times (Inductor's online softmax does
the same). The sum differs from eager's two-pass sum by rounding only.

``online_pairs`` finds the pattern in a kernel: ``S = sum(exp(x - M))``
with ``M = amax(x)`` over the same dims, both in the kernel. The kernel
writer then places ``S`` at ``M``'s level, emits ``update`` inside that
walk instead of ``S``'s own accumulation, and ``finish`` after ``M``'s.
"""

from __future__ import annotations

import torch
from retrograd.codegen import ops
from retrograd.codegen.reduction_kinds import SUM, describe_reduction

__all__ = ["finish", "online_pairs", "update"]

aten = torch.ops.aten


def _in_group(writer, arg):
    """The in-kernel node ``arg`` is (through an alias), else None."""
    if not hasattr(arg, "name"):
        return None
    return writer.group.get(writer.kernel.aliases.get(arg.name, arg.name))


def online_pairs(writer) -> dict[str, tuple]:
    """{sum node name: (max node, x node)} for each ``sum(exp(x - amax(x)))``."""
    pairs = {}
    for node in writer.kernel.nodes:
        described = describe_reduction(node)
        if described is None or described[2] != "sum":
            continue
        exp = _in_group(writer, described[0])
        if exp is None or exp.target is not aten.exp.default:
            continue
        sub = _in_group(writer, exp.args[0])
        if sub is None or sub.target is not aten.sub.Tensor or "alpha" in sub.kwargs:
            continue
        peak = _in_group(writer, sub.args[1])
        peak_described = describe_reduction(peak) if peak is not None else None
        if peak_described is None or peak_described[2] != "max" \
                or peak_described[1] != described[1] \
                or _in_group(writer, peak_described[0]) is not _in_group(writer, sub.args[0]) \
                or not node.meta["val"].dtype.is_floating_point:
            continue
        pairs[node.name] = (peak, sub.args[0])
    return pairs


def update(writer, node, peak, x) -> None:
    """Inside the walk, before ``peak``'s own update: rescale the running sum
    to the new running max and add this block's exponentials."""
    value = writer.operand(peak, x, None, True)
    name, m = node.name, f"{peak.name}_acc"
    writer.emit(f"{name}_m = _maximum({m}, tl.where(mask, {value}, {m}))   # new running max")
    # a -inf element adds exp(-inf) = 0 (computed, it would be NaN where the
    # running max is -inf too)
    writer.emit(f"{name}_acc = {name}_acc * tl.where({m} == {name}_m, 1.0, "
                f"tl.exp({m} - {name}_m)) + tl.where(mask & ({value} != float(\"-inf\")), "
                f"tl.exp({value} - {name}_m), 0)")


def finish(writer, node, peak) -> None:
    """After ``peak``'s finish: the lanes' sums rescaled to the row's max."""
    name, m = node.name, f"{peak.name}_acc"
    writer.emit(f"{name} = tl.reduce({name}_acc * tl.where({m} == {peak.name}, 1.0, "
                f"tl.exp({m} - {peak.name})), 1, {SUM}, keep_dims=True)")
    writer.dtypes[name] = ops.compute_dtype(node.meta["val"].dtype)
