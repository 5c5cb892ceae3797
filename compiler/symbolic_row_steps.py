"""How each fx node of a row group (symbolic_rows.py) becomes steps of a
row-wise kernel (codegen/sized_rows.py): an elementwise node one step; a
sum or amax one reduction; a mean, a var_mean (two walks: the mean, then the
sum of squared deviations, as torch's two-pass variance) and the softmax
family (the max, then the sum of ``exp(x - max)``) several."""

from __future__ import annotations

import torch
from retrograd.codegen.sized_pointwise import expression
from retrograd.codegen.sized_rows import Step
from torch import fx

__all__ = ["safe_name", "steps"]

aten = torch.ops.aten
#: What is not elementwise: reductions over the last dimension, the softmax family.
ROW_TARGETS = {aten.sum.dim_IntList, aten.mean.dim, aten.amax.default,
               aten.var_mean.correction, aten._softmax.default, aten._log_softmax.default,
               aten._softmax_backward_data.default, aten._log_softmax_backward_data.default}


#: Names the kernel's own code uses: an fx value of that name is renamed.
_RESERVED = {"rows", "cols", "mask", "row_mask", "offsets", "start", "n_rows", "n_cols",
             "ROWS", "BLOCK", "tl", "triton", "launch", "grid"}


def safe_name(name: str) -> str:
    """``name``, renamed where the kernel's own code uses it."""
    return f"{name}_value" if name in _RESERVED else name


def _expression(node: fx.Node, names: dict) -> str:
    """The Triton expression of an elementwise member over value names."""
    operands = [names[a] if isinstance(a, fx.Node) else repr(float(a)) for a in node.args]
    return expression(node.target, operands, node.args)


def steps(node: fx.Node, names: dict) -> list[Step]:
    """The steps of one member (the softmax family and var_mean expanded)."""
    n, target = safe_name(node.name), node.target
    source = names.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
    if target not in ROW_TARGETS:   # elementwise
        uses = [names[a] for a in node.args if isinstance(a, fx.Node)]
        return [Step(n, names["kind", node], _expression(node, names), uses)]
    if target is aten.sum.dim_IntList:
        return [Step(n, "sum", uses=[source])]
    if target is aten.amax.default:
        return [Step(n, "max", uses=[source])]
    if target is aten.mean.dim:
        return [Step(f"{n}_sum", "sum", uses=[source]),
                Step(n, "row", f"{n}_sum / n_cols", [f"{n}_sum"])]
    if target is aten.var_mean.correction:
        correction = node.kwargs.get("correction", 1)
        return [Step(f"{n}_sum", "sum", uses=[source]),
                Step(f"{n}_mean", "row", f"{n}_sum / n_cols", [f"{n}_sum"]),
                Step(f"{n}_centred", "full", f"{source} - {n}_mean", [source, f"{n}_mean"]),
                Step(f"{n}_square", "full", f"{n}_centred * {n}_centred", [f"{n}_centred"]),
                Step(f"{n}_squares", "sum", uses=[f"{n}_square"]),
                Step(f"{n}_var", "row", f"{n}_squares / (n_cols - {correction})",
                     [f"{n}_squares"])]
    return _softmax_steps(node, names, source)


def _softmax_steps(node: fx.Node, names: dict, x: str) -> list[Step]:
    n, target = safe_name(node.name), node.target
    if target is aten._softmax.default:   # exp(x - max) / sum
        return [Step(f"{n}_max", "max", uses=[x]),
                Step(f"{n}_exp", "full", f"tl.exp({x} - {n}_max)", [x, f"{n}_max"]),
                Step(f"{n}_sum", "sum", uses=[f"{n}_exp"]),
                Step(n, "full", f"{n}_exp / {n}_sum", [f"{n}_exp", f"{n}_sum"])]
    if target is aten._log_softmax.default:   # x - max - log(sum(exp(x - max)))
        return [Step(f"{n}_max", "max", uses=[x]),
                Step(f"{n}_shifted", "full", f"{x} - {n}_max", [x, f"{n}_max"]),
                Step(f"{n}_exp", "full", f"tl.exp({n}_shifted)", [f"{n}_shifted"]),
                Step(f"{n}_sum", "sum", uses=[f"{n}_exp"]),
                Step(f"{n}_log_sum", "row", f"tl.log({n}_sum)", [f"{n}_sum"]),
                Step(n, "full", f"{n}_shifted - {n}_log_sum", [f"{n}_shifted", f"{n}_log_sum"])]
    y = names[node.args[1]]
    if target is aten._softmax_backward_data.default:   # y * (g - sum(g * y))
        return [Step(f"{n}_gy", "full", f"{x} * {y}", [x, y]),
                Step(f"{n}_sum", "sum", uses=[f"{n}_gy"]),
                Step(n, "full", f"{y} * ({x} - {n}_sum)", [x, y, f"{n}_sum"])]
    # _log_softmax_backward_data: g - exp(y) * sum(g)
    return [Step(f"{n}_sum", "sum", uses=[x]),
            Step(n, "full", f"{x} - tl.exp({y}) * {n}_sum", [x, y, f"{n}_sum"])]
