"""How the torch program calls an aten op: the cheapest spelling that is the same op.

Calling an ``OpOverload`` from Python (``aten.mul.Tensor(a, b)``) costs a
Python frame and two attribute lookups on top of the op: on small tensors
about twice what ``torch.mul(a, b)`` costs (measured on this project's CPU:
7.0 us against 3.9 us for a 4x8 product; 11.5 against 6.7 us for a sum over
one dim). The torch program therefore calls torch's own function of the same
name where it resolves to the same overload, and otherwise the overload's
C++ entry point, bound once at the top of the program.

"The same overload" is checked when the program is written, on meta tensors
of the node's recorded operands: both calls must accept the arguments and
give results of the same shapes, strides and dtypes (torch's argument parser
picks among the overloads of one name, which ATen keeps the same op with
other argument types: ``add.Tensor`` and ``add.Scalar``). Anything that
cannot be checked (an operand without a recorded tensor, an op meta tensors
do not run) keeps the overload.
"""

from __future__ import annotations

import torch
from torch import fx

__all__ = ["accepts_out", "bound_name", "in_place_method", "torch_function"]

_FUNCTIONS = torch._C._VariableFunctions


def bound_name(target: torch._ops.OpOverload) -> str:
    """The module-level name the program binds an overload's entry point to."""
    return f"{target.namespace}_{target._opname}_{target._overloadname}"


def torch_function(node: fx.Node) -> str | None:
    """``"torch.<name>"`` when torch's function of the op's name computes
    ``node`` as its overload does (checked on meta tensors), else None."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return None
    name = target._opname
    function = getattr(_FUNCTIONS, name, None)
    if function is None or getattr(torch, name, None) is not function:
        return None
    try:
        args, kwargs, _ = _meta_operands(node)
        return f"torch.{name}" if _same(target(*args, **kwargs),
                                        function(*args, **kwargs)) else None
    except Exception:   # noqa: BLE001 -- any refusal means: keep the overload
        return None


def accepts_out(node: fx.Node, operand: fx.Node) -> bool:
    """torch's function of ``node``'s op, called with ``out=`` its operand
    ``operand`` (the same tensor, or another value: a donated input), writes
    there what the overload returns (checked on meta tensors;
    ``torch_program``'s in-place writes)."""
    target = node.target
    function = getattr(_FUNCTIONS, getattr(target, "_opname", ""), None)
    if function is None:
        return False
    try:
        args, kwargs, _ = _meta_operands(node)
        expected = target(*args, **kwargs)
        args, kwargs, metas = _meta_operands(node)   # fresh: out= writes over one of them
        out = metas[operand] if operand in metas else _meta(operand)
        got = function(*args, **kwargs, out=out)
    except Exception:   # noqa: BLE001 -- any refusal means: no out= form
        return False
    return got is out and _same(expected, got)


def in_place_method(node: fx.Node) -> str | None:
    """``"<op>_"`` when the tensor method of that name, called on ``node``'s
    first operand, computes what the overload does (checked on meta tensors):
    ``a.mul_(b)`` is about a microsecond cheaper than ``torch.mul(a, b, out=a)``."""
    target = node.target
    name = f"{getattr(target, '_opname', '')}_"
    if not isinstance(getattr(torch.Tensor, name, None), type(torch.Tensor.add_)):
        return None
    try:
        args, kwargs, _ = _meta_operands(node)
        expected = target(*args, **kwargs)
        args, kwargs, _ = _meta_operands(node)
        got = getattr(args[0], name)(*args[1:], **kwargs)
    except Exception:   # noqa: BLE001 -- any refusal means: keep out=
        return None
    return name if got is args[0] and _same(expected, got) else None


class _Unknown(Exception):
    """An operand without a recorded tensor value."""


def _meta(operand: fx.Node) -> torch.Tensor:
    value = operand.meta.get("val")
    if not isinstance(value, torch.Tensor):
        raise _Unknown(operand.name)
    return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")


def _meta_operands(node: fx.Node):
    """Meta tensors of ``node``'s operands (one per operand node, however often
    it is read: ``x * x`` reads one tensor twice), and those tensors by node."""
    metas: dict[fx.Node, torch.Tensor] = {}

    def meta(operand: fx.Node):
        if operand in metas:
            return metas[operand]
        metas[operand] = _meta(operand)
        return metas[operand]
    args = fx.node.map_arg(node.args, meta)
    kwargs = dict(fx.node.map_arg(node.kwargs, meta))
    if "device" in kwargs:   # factories: made on meta too, never allocated for real
        kwargs["device"] = torch.device("meta")
    return args, kwargs, metas


def _same(expected, got) -> bool:
    if isinstance(expected, torch.Tensor):
        return isinstance(got, torch.Tensor) and expected.shape == got.shape \
            and expected.dtype == got.dtype and expected.stride() == got.stride()
    if isinstance(expected, (tuple, list)):
        return isinstance(got, (tuple, list)) and len(expected) == len(got) \
            and all(_same(e, g) for e, g in zip(expected, got))
    return type(expected) is type(got) and expected == got
