"""How each aten op becomes a Triton expression inside a pointwise kernel.

One table, ``LOWERINGS``, maps an aten overload to a small function that
receives the fx node and an ``operand`` callback (which renders an argument:
a register name, a loaded value or a literal, optionally cast) and returns
the expression text. The fusion pass asks ``can_lower(node)`` (through the
compiler, which hands it this predicate) so that only ops listed here ever
reach a kernel; everything else stays an extern call of the aten op.

Only Triton's builtins appear in generated code, never the functions that
``triton.language.standard`` defines with ``@jit`` (``tl.sigmoid``,
``tl.zeros``, ``tl.sum``...): those are decorated when triton is imported,
so when triton was imported without TRITON_INTERPRET they cannot run under
the interpreter ("Cannot call @triton.jit'd outside of the scope of a
kernel"). Math follows ../shared/TRITON_ON_CPU.md: no libdevice (tanh, pow, log1p are
built from primitives so the same source runs on GPUs and in the
interpreter), and half-precision values are computed in float32.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from retrograd.codegen.fills_and_generators import (
    FILL_OPS,
    RANDOM_OPS,
    fill_value,
    held_as,
    is_fill,
    is_generator,
    is_random,
    reads_shape_only,
)
from retrograd.codegen.triton_types import (
    FLOATS,
    TRITON_DTYPES,
    compute_dtype,
    literal,
    triton_dtype,
)

#: The lowering table and its queries; the dtype and literal spelling
#: (triton_types.py) and the fill and generator queries (fills_and_generators.py)
#: are re-exported, since every kernel writer reaches them as ``ops.<name>``.
__all__ = ["LOWERINGS", "can_lower", "lower",
           "FILL_OPS", "RANDOM_OPS", "is_random", "is_generator", "reads_shape_only",
           "is_fill", "fill_value", "TRITON_DTYPES", "FLOATS", "compute_dtype",
           "triton_dtype", "literal"]

aten = torch.ops.aten

Operand = Callable[..., str]   # operand(arg, cast_to: torch.dtype | None = None) -> str
Lowering = Callable[[Any, Operand], str]
LOWERINGS: dict[Any, Lowering] = {}


def _register(*ops):
    def decorate(function: Lowering) -> Lowering:
        for op in ops:
            LOWERINGS[op] = function
        return function
    return decorate


def _out(node) -> torch.dtype:
    return compute_dtype(node.meta["val"].dtype)


def _float_out(node) -> torch.dtype:
    """Float math runs in the result's compute dtype (ints promote to float32)."""
    dtype = _out(node)
    return dtype if dtype in FLOATS else torch.float32


def _alpha(node, text: str, operand: Operand) -> str:
    alpha = node.kwargs.get("alpha", 1)
    return text if alpha == 1 else f"{operand(alpha)} * {text}"


# ---------------------------------------------------------------- arithmetic
@_register(aten.add.Tensor, aten.add.Scalar)
def _add(node, operand):
    a, b = node.args[:2]
    return f"{operand(a)} + {_alpha(node, operand(b), operand)}"


@_register(aten.sub.Tensor, aten.sub.Scalar)
def _sub(node, operand):
    a, b = node.args[:2]
    return f"{operand(a)} - {_alpha(node, operand(b), operand)}"


@_register(aten.rsub.Scalar, aten.rsub.Tensor)
def _rsub(node, operand):
    a, b = node.args[:2]
    return f"{operand(b)} - {_alpha(node, operand(a), operand)}"


@_register(aten.div.Tensor_mode, aten.div.Scalar_mode)
def _div_mode(node, operand):
    dtype = _float_out(node)
    a, b = operand(node.args[0], dtype), operand(node.args[1], dtype)
    quotient = f"{a} / {b}"
    mode = node.kwargs.get("rounding_mode")
    if mode == "floor":
        return f"_div_floor({a}, {b})"
    if mode == "trunc":
        return f"_trunc({quotient})"
    return quotient


@_register(aten.neg.default)
def _neg(node, operand):
    return f"-{operand(node.args[0])}"


@_register(aten.reciprocal.default)
def _reciprocal(node, operand):
    return f"1.0 / {operand(node.args[0], _float_out(node))}"


@_register(aten.clamp.default, aten.clamp.Tensor)
def _clamp(node, operand):
    low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
    high = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
    text = operand(node.args[0], _out(node))
    if low is not None:
        text = f"_maximum({text}, {operand(low, _out(node))})"
    if high is not None:
        text = f"_minimum({text}, {operand(high, _out(node))})"
    return text


@_register(aten.pow.Tensor_Scalar)
def _pow_scalar(node, operand):
    dtype = _float_out(node)
    base, exponent = node.args
    x = operand(base, dtype)
    small = {0: "1.0", 1: x, 2: f"{x} * {x}", 3: f"{x} * {x} * {x}",
             0.5: f"tl.sqrt({x})", -0.5: f"tl.rsqrt({x})", -1: f"1.0 / {x}",
             -2: f"1.0 / ({x} * {x})", 4: f"({x} * {x}) * ({x} * {x})"}
    if exponent in small:
        return small[exponent]
    # The exponent goes in as a block shaped like the base, not a scalar: the
    # interpreter types a comparison of two scalars wrongly (an int1 result held
    # as float32), and _pow's sign logic compares the exponent with itself.
    # ``x.shape``, not [BLOCK]: in a reduction kernel the block is 2-D.
    return f"_pow({x}, tl.full(({x}).shape, {literal(float(exponent))}, {triton_dtype(dtype)}))"


@_register(aten.pow.Scalar)
def _pow_base_scalar(node, operand):
    """A scalar base goes through _pow too: exp2(y * log2(base)) alone has no
    meaning for a base <= 0 and gets 1 ** nan, inf ** 0 wrong."""
    dtype = _float_out(node)
    y = operand(node.args[1], dtype)
    return f"_pow(tl.full(({y}).shape, {literal(float(node.args[0]))}, {triton_dtype(dtype)}), {y})"


# ---------------------------------------------------------------- the two factories
def _unary(function: str):
    """``function(x)``, the argument cast to the node's float compute dtype."""
    def lowering(node, operand):
        return f"{function}({operand(node.args[0], _float_out(node))})"
    return lowering


def _binary(template: str, dtype: Callable[[Any], torch.dtype] | None = None) -> Lowering:
    """``template`` with the node's first two arguments as ``{0}`` and ``{1}``,
    rendered in that order (renders may emit loads) and each cast to
    ``dtype(node)`` when ``dtype`` is given (``_out``, ``_float_out``)."""
    def lowering(node, operand):
        cast = dtype(node) if dtype is not None else None
        return template.format(operand(node.args[0], cast), operand(node.args[1], cast))
    return lowering


for _ops, _lowering in [
        ((aten.mul.Tensor, aten.mul.Scalar), _binary("{0} * {1}")),
        ((aten.div.Tensor, aten.div.Scalar), _binary("{0} / {1}", _float_out)),
        ((aten.maximum.default, aten.clamp_min.default, aten.clamp_min.Tensor),
         _binary("_maximum({0}, {1})", _out)),
        ((aten.minimum.default, aten.clamp_max.default, aten.clamp_max.Tensor),
         _binary("_minimum({0}, {1})", _out)),
        ((aten.pow.Tensor_Tensor,), _binary("_pow({0}, {1})", _float_out)),
        ((aten.remainder.Tensor, aten.remainder.Scalar), _binary("_remainder({0}, {1})", _out))]:
    for _op in _ops:
        LOWERINGS[_op] = _lowering


# ---------------------------------------------------------------- unary math


for _op, _fn in [(aten.exp.default, "tl.exp"), (aten.exp2.default, "tl.exp2"),
                 (aten.log.default, "tl.log"), (aten.log2.default, "tl.log2"),
                 (aten.sqrt.default, "tl.sqrt"), (aten.rsqrt.default, "tl.rsqrt"),
                 (aten.sigmoid.default, "_sigmoid"), (aten.erf.default, "tl.math.erf"),
                 (aten.sin.default, "tl.sin"), (aten.cos.default, "tl.cos"),
                 (aten.tanh.default, "_tanh"), (aten.expm1.default, "_expm1"),
                 (aten.log1p.default, "_log1p"), (aten.floor.default, "tl.floor"),
                 (aten.ceil.default, "tl.ceil"), (aten.trunc.default, "_trunc")]:
    LOWERINGS[_op] = _unary(_fn)


@_register(aten.abs.default)
def _abs(node, operand):
    return f"tl.abs({operand(node.args[0])})"


@_register(aten.relu.default)
def _relu(node, operand):
    return f"_maximum({operand(node.args[0])}, 0)"


@_register(aten.sign.default)
def _sign(node, operand):
    x = operand(node.args[0])
    return f"(({x} > 0).to({triton_dtype(_out(node))}) - ({x} < 0).to({triton_dtype(_out(node))}))"


@_register(aten.isnan.default)
def _isnan(node, operand):
    x = operand(node.args[0])
    return f"{x} != {x}"


@_register(aten.isinf.default)
def _isinf(node, operand):
    return f"tl.abs({operand(node.args[0])}) == float(\"inf\")"


# ---------------------------------------------------------------- comparisons, logic
for _name, _symbol in [("eq", "=="), ("ne", "!="), ("lt", "<"), ("le", "<="),
                       ("gt", ">"), ("ge", ">="), ("bitwise_and", "&"), ("bitwise_or", "|"),
                       ("bitwise_xor", "^")]:
    LOWERINGS[getattr(aten, _name).Tensor] = LOWERINGS[getattr(aten, _name).Scalar] = \
        _binary(f"{{0}} {_symbol} {{1}}")

for _name, _symbol in [("logical_and", "&"), ("logical_or", "|"), ("logical_xor", "^")]:
    LOWERINGS[getattr(aten, _name).default] = _binary(f"({{0}} != 0) {_symbol} ({{1}} != 0)")


@_register(aten.logical_not.default)
def _logical_not(node, operand):
    return f"{operand(node.args[0])} == 0"


@_register(aten.bitwise_not.default)
def _bitwise_not(node, operand):
    if node.meta["val"].dtype == torch.bool:
        return f"{operand(node.args[0])} == 0"
    return f"~{operand(node.args[0])}"


@_register(aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar)
def _where(node, operand):
    condition, a, b = node.args
    return f"tl.where({operand(condition)}, {operand(a, _out(node))}, {operand(b, _out(node))})"


# ---------------------------------------------------------------- copies and casts
@_register(aten.clone.default, aten.alias.default, aten.lift_fresh_copy.default,
           aten.contiguous.default, aten.detach.default)
def _identity(node, operand):
    return operand(node.args[0], _out(node))


@_register(aten._to_copy.default, torch.ops.prims.convert_element_type.default)
def _cast(node, operand):
    target = node.meta["val"].dtype
    if is_fill(node.args[0]):   # a cast of a constant is a constant: fold it here
        return literal(held_as(fill_value(node.args[0]), target))
    source = getattr(getattr(node.args[0], "meta", {}).get("val"), "dtype", None)
    leaves_half = source in _ROUND_HALF and target != source
    value = operand(node.args[0], torch.float32 if leaves_half else compute_dtype(target))
    if leaves_half:
        # A half value computed in float32 registers leaves its dtype here:
        # round it to that dtype first, so a widening cast sees torch's value.
        value = _ROUND_HALF[source].format(value)
        if compute_dtype(target) != torch.float32:
            value = f"{value}.to({triton_dtype(compute_dtype(target))})"
    # A cast to half precision must round, even though registers stay float32:
    # what follows in the kernel has to see the value torch would see.
    return _ROUND_HALF[target].format(value) if target in _ROUND_HALF else value


_ROUND_HALF = {torch.bfloat16: "_round_to_bf16({})",
               torch.float16: "{}.to(tl.float16).to(tl.float32)"}


@_register(aten.copy.default)
def _copy(node, operand):
    return operand(node.args[1], _out(node))


# ---------------------------------------------------------------- fills and generators
def _fill(node, operand):
    dtype = triton_dtype(_out(node))
    return f"tl.full([BLOCK], {literal(fill_value(node))}, {dtype})"


for _op in FILL_OPS:
    LOWERINGS[_op] = _fill


@_register(aten.arange.start_step, aten.arange.start, aten.arange.default)
def _arange(node, operand):
    args = list(node.args)
    if node.target == aten.arange.default:
        start, step = 0, 1
    else:
        start = args[0]
        step = args[2] if len(args) > 2 else node.kwargs.get("step", 1)
    dtype = triton_dtype(_out(node))
    return f"({literal(start)} + offsets * {literal(step)}).to({dtype})"


# ---------------------------------------------------------------- queries
def _tensor_dtypes(node) -> list[torch.dtype]:
    vals = [node.meta.get("val")]
    for arg in node.all_input_nodes:
        vals.append(arg.meta.get("val"))
    return [v.dtype for v in vals if isinstance(v, torch.Tensor)]


def can_lower(node) -> bool:
    """True when ``node`` can run inside a generated pointwise kernel."""
    if node.op != "call_function" or node.target not in LOWERINGS and not is_random(node):
        return False
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.numel() == 0:
        return False
    if any(dtype not in TRITON_DTYPES for dtype in _tensor_dtypes(node)):
        return False
    if node.target in (aten.div.Tensor_mode, aten.div.Scalar_mode) and val.dtype not in FLOATS:
        return False
    if is_random(node) and val.dtype not in FLOATS:
        return False
    for arg in node.all_input_nodes:   # inputs must be tensors we can index
        if not isinstance(arg.meta.get("val"), torch.Tensor):
            return False
    return True


def lower(node, operand: Operand) -> str:
    return LOWERINGS[node.target](node, operand)

