"""What each reduction kind is and the code it adds to a reduction loop.

``REDUCTIONS`` maps an aten reduction to its kind (sum, mean, prod, max,
min, argmax, argmin, max_dim and min_dim (values and indices, as argmax
finds them), any, all, var, var_mean); ``describe_reduction`` and
``can_reduce`` say what a node reduces and whether codegen emits it. The
kernel writer (``reduction.py``) walks the reduced extent in loops and asks
this module for each kind's three pieces: the accumulator and its identity
before the loop (``initialise``), the update with one ``[ROWS, RBLOCK]``
block inside it (``accumulate``), and the combination of the lanes into one
value per row after it (``finish``).
"""

from __future__ import annotations

import math

import torch

from retrograd.codegen import ops

__all__ = ["REDUCTIONS", "REDUCE_HELPERS", "PARTS", "describe_reduction", "can_reduce",
           "initialise", "accumulate", "finish", "accumulator_dtype"]

aten = torch.ops.aten

#: aten reduction -> (kind, position of ``dim`` or None for "all dims").
REDUCTIONS = {
    aten.sum.dim_IntList: ("sum", 1), aten.sum.default: ("sum", None),
    aten.mean.dim: ("mean", 1), aten.mean.default: ("mean", None),
    aten.amax.default: ("max", 1), aten.amin.default: ("min", 1),
    aten.max.default: ("max", None), aten.min.default: ("min", None),
    aten.prod.dim_int: ("prod", 1), aten.prod.default: ("prod", None),
    aten.argmax.default: ("argmax", 1), aten.argmin.default: ("argmin", 1),
    aten.any.dims: ("any", 1), aten.any.dim: ("any", 1), aten.any.default: ("any", None),
    aten.all.dims: ("all", 1), aten.all.dim: ("all", 1), aten.all.default: ("all", None),
    aten.var_mean.correction: ("var_mean", 1), aten.var.correction: ("var", 1),
    aten.max.dim: ("max_dim", 1), aten.min.dim: ("min_dim", 1),
}

#: Kinds whose value is a tuple: the variable each ``getitem`` reads, by index.
PARTS = {"var_mean": ("var", "mean"), "max_dim": ("values", "indices"),
         "min_dim": ("values", "indices")}

#: Kinds that find the position of the best element, and which way is better.
_ARG_KINDS = {"argmax": ">", "argmin": "<", "max_dim": ">", "min_dim": "<"}

REDUCE_HELPERS = {
    "_mul": '''
@triton.jit
def _mul(a, b):
    return a * b
''',
}

#: Combine functions of triton.language.standard. Passed to ``tl.reduce``
#: they compile as usual on GPUs, and the interpreter recognises them and
#: reduces with numpy instead of calling a Python combine per element (which
#: costs ~100 microseconds an element). Only the reference is used, never a
#: call, so they work even where triton was imported without TRITON_INTERPRET.
SUM, MAX, MIN = ("tl.standard._sum_combine", "tl.standard._elementwise_max",
                 "tl.standard._elementwise_min")


def _dims(node, position) -> tuple[int, ...]:
    val = node.args[0].meta["val"]
    rank = val.dim()
    dims = node.args[position] if position is not None and len(node.args) > position \
        else node.kwargs.get("dim") if position is not None else None
    if dims is None or dims == []:
        return tuple(range(rank))
    if isinstance(dims, int):
        dims = [dims]
    return tuple(sorted(d % rank for d in dims)) if rank else ()


def describe_reduction(node):
    """(input node, reduced dims, kind) of a reduction we lower, else None."""
    if getattr(node, "op", None) != "call_function" or node.target not in REDUCTIONS:
        return None
    kind, position = REDUCTIONS[node.target]
    source = node.args[0]
    if not hasattr(source, "meta") or not isinstance(source.meta.get("val"), torch.Tensor):
        return None
    return source, _dims(node, position), kind


def can_reduce(node) -> bool:
    """True when ``node`` is a reduction codegen can emit (over a real extent)."""
    described = describe_reduction(node)
    if described is None:
        return False
    source, dims, _ = described
    val = source.meta["val"]
    if val.dtype not in ops.TRITON_DTYPES or val.numel() == 0 or not dims:
        return False
    extent = math.prod(val.shape[d] for d in dims)
    outputs = node.meta.get("val")
    outputs = outputs if isinstance(outputs, (tuple, list)) else [outputs]
    return extent > 1 and all(isinstance(o, torch.Tensor) and o.dtype in ops.TRITON_DTYPES
                              for o in outputs)


def accumulate(writer, node) -> None:
    """Inside the loop: fold this block of the input into the accumulator."""
    source, _, kind = describe_reduction(node)
    value = writer.operand(node, source, None, True)
    acc = f"{node.name}_acc"
    if kind in ("sum", "mean"):
        writer.emit(f"{acc} = {acc} + tl.where(mask, {value}, 0)")
    elif kind == "prod":
        writer.emit(f"{acc} = {acc} * tl.where(mask, {value}, 1)")
    elif kind in ("max", "min"):
        helper = "_maximum" if kind == "max" else "_minimum"
        writer.emit(f"{acc} = {helper}({acc}, tl.where(mask, {value}, {acc}))")
    elif kind in ("any", "all"):
        helper = "_maximum" if kind == "any" else "_minimum"
        writer.emit(f"{acc} = {helper}({acc}, tl.where(mask, ({value} != 0).to(tl.int32), "
                  f"{acc}))")
    elif kind in _ARG_KINDS:
        better = _ARG_KINDS[kind]
        writer.emit(f"take = mask & (({value} {better} {acc}) | (({value} != {value}) "
                  f"& ({acc} == {acc})))")
        writer.emit(f"{acc} = tl.where(take, {value}, {acc})")
        writer.emit(f"{node.name}_index = tl.where(take, ks, {node.name}_index)")
    else:   # var, var_mean: Welford, one update per lane and element
        dtype = ops.triton_dtype(accumulator_dtype(node))
        writer.emit(f"{node.name}_count = {node.name}_count + mask.to({dtype})")
        writer.emit(f"delta = tl.where(mask, {value} - {node.name}_mean, 0.0)")
        writer.emit(f"{node.name}_mean = {node.name}_mean + delta / "
                  f"tl.where({node.name}_count == 0, 1.0, {node.name}_count)")
        writer.emit(f"{node.name}_m2 = {node.name}_m2 + delta * tl.where(mask, {value} - "
                  f"{node.name}_mean, 0.0)")

def initialise(writer, node) -> None:
    _, _, kind = describe_reduction(node)
    dtype = accumulator_dtype(node)
    tl_dtype = ops.triton_dtype(dtype)
    shape = "[ROWS, RBLOCK]"
    if kind in ("var", "var_mean"):
        for part in ("mean", "m2", "count"):
            writer.emit(f"{node.name}_{part} = tl.full({shape}, 0, {tl_dtype})")
        return
    identity = {"sum": 0, "mean": 0, "prod": 1, "any": 0, "all": 1}.get(kind)
    if kind in ("max", "argmax", "max_dim"):
        identity = 'float("-inf")' if dtype.is_floating_point else str(
            torch.iinfo(dtype).min if dtype != torch.bool else 0)
    elif kind in ("min", "argmin", "min_dim"):
        identity = 'float("inf")' if dtype.is_floating_point else str(
            torch.iinfo(dtype).max if dtype != torch.bool else 1)
    if kind in ("any", "all"):
        tl_dtype = "tl.int32"
    writer.emit(f"{node.name}_acc = tl.full({shape}, {identity}, {tl_dtype})")
    if kind in _ARG_KINDS:
        writer.emit(f"{node.name}_index = tl.full({shape}, 0, tl.int64)")

def accumulator_dtype(node) -> torch.dtype:
    source, _, kind = describe_reduction(node)
    if kind in ("max", "min") or kind in _ARG_KINDS:
        return ops.compute_dtype(source.meta["val"].dtype)
    out = node.meta["val"]
    out = out[0] if isinstance(out, (tuple, list)) else out
    return ops.compute_dtype(out.dtype)

def _finish_arg(writer, node, kind: str) -> None:
    """argmax/argmin: the first index of the best lane value (a NaN is best);
    max_dim/min_dim also that value, as ``{name}_values`` and ``{name}_indices``."""
    name, acc = node.name, f"{node.name}_acc"
    dtype = accumulator_dtype(node)
    combine = MAX if _ARG_KINDS[kind] == ">" else MIN
    writer.emit(f"{name}_best = tl.reduce({acc}, 1, {combine}, keep_dims=True)")
    hit = f"({acc} == {name}_best)"
    if dtype.is_floating_point:
        writer.emit(f"{name}_nans = tl.reduce(({acc} != {acc}).to(tl.int32), 1, {SUM}, "
                    f"keep_dims=True)")
        hit = f"tl.where({name}_nans > 0, {acc} != {acc}, {hit})"
    # the smallest index among lanes holding the winner: torch's first occurrence
    writer.emit(f"{name} = tl.reduce(tl.where({hit}, {name}_index, {2 ** 62}), 1, {MIN}, "
                f"keep_dims=True)")
    if kind in PARTS:
        best = f'tl.where({name}_nans > 0, float("nan"), {name}_best)' \
            if dtype.is_floating_point else f"{name}_best"
        writer.emit(f"{name}_values = {best}")
        writer.emit(f"{name}_indices = {name}")
        writer.dtypes[f"{name}_values"], writer.dtypes[f"{name}_indices"] = dtype, torch.int64


def finish(writer, node) -> None:
    """After the loop: combine the lanes into one value per row."""
    _, _, kind = describe_reduction(node)
    name, acc = node.name, f"{node.name}_acc"
    out = node.meta["val"]
    if kind in ("sum", "mean"):
        text = f"tl.reduce({acc}, 1, {SUM}, keep_dims=True)"
        writer.emit(f"{name} = {text} / {float(writer.extent)}" if kind == "mean" else
                  f"{name} = {text}")
    elif kind == "prod":
        writer.emit(f"{name} = tl.reduce({acc}, 1, _mul, keep_dims=True)")
    elif kind in ("max", "min", "any", "all"):
        combine = MAX if kind in ("max", "any") else MIN
        writer.emit(f"{name} = tl.reduce({acc}, 1, {combine}, keep_dims=True)")
        if kind in ("any", "all"):
            writer.emit(f"{name} = {name} != 0")
        elif accumulator_dtype(node).is_floating_point:   # a NaN lane wins
            writer.emit(f"{name}_nans = tl.reduce(({acc} != {acc}).to(tl.int32), 1, {SUM}, "
                      f"keep_dims=True)")
            writer.emit(f'{name} = tl.where({name}_nans > 0, float("nan"), {name})')
    elif kind in _ARG_KINDS:
        _finish_arg(writer, node, kind)
    else:
        correction = node.kwargs.get("correction")
        correction = 1 if correction is None else correction
        # Chan et al.'s merge of the lanes' (mean, M2, count), written with sums
        writer.emit(f"{name}_lane_mean = {name}_mean")
        writer.emit(f"{name}_n = tl.reduce({name}_count, 1, {SUM}, keep_dims=True)")
        writer.emit(f"{name}_mean = tl.reduce({name}_lane_mean * {name}_count, 1, {SUM}, "
                  f"keep_dims=True) / tl.where({name}_n == 0, 1.0, {name}_n)")
        writer.emit(f"{name}_m2 = tl.reduce({name}_m2 + {name}_count * ({name}_lane_mean - "
                  f"{name}_mean) * ({name}_lane_mean - {name}_mean), 1, {SUM}, "
                  f"keep_dims=True)")
        divisor = max(0.0, float(writer.extent - correction))
        writer.emit(f"{name}_var = {name}_m2 / {divisor!r}" if divisor else
                  f"{name}_var = {name}_m2 * float(\"nan\")")
        if kind == "var":
            writer.emit(f"{name} = {name}_var")
        writer.dtypes[f"{name}_var"] = writer.dtypes[f"{name}_mean"] = \
            accumulator_dtype(node)
    if not isinstance(out, (tuple, list)):
        writer.dtypes[name] = ops.compute_dtype(out.dtype)
