"""The decomposition table: which ATen ops the joint graph is written in.

Start from PyTorch's core ATen decompositions (what every backend may
assume) and also decompose the composite ops whose parts codegen fuses
well: dropout into a uniform draw and a comparison (so the mask comes from
codegen's counter-based generator), GELU into erf and products, layer norm
and softmax into reductions and pointwise math, batch norm into the same.
What remains for codegen is a small set: pointwise math (docs/ops.md lists
every lowered op), reductions, matrix products, convolutions, indexing and
RNG.
"""

from __future__ import annotations

import functools

import torch
import torch._decomp

__all__ = ["decomposition_table"]

aten = torch.ops.aten

EXTRA = [
    aten.gelu, aten.native_layer_norm, aten._softmax, aten._log_softmax,
    aten._native_batch_norm_legit_functional, aten._native_batch_norm_legit_no_training,
    aten.native_batch_norm,   # what compile_step's functionalized trace reaches
    # what the no_training decomposition calls: mutable by its schema (it
    # writes running stats when training), so it must not reach the graph
    aten._native_batch_norm_legit,
    aten.native_group_norm, aten.hardswish, aten.hardsigmoid, aten.silu, aten.mish,
    aten.elu, aten.leaky_relu, aten.softplus, aten.native_dropout,
]


@functools.lru_cache(maxsize=None)
def decomposition_table() -> dict:
    table = dict(torch._decomp.core_aten_decompositions())
    table.update(torch._decomp.get_decompositions(EXTRA))
    return table
