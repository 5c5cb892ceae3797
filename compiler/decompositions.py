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


def _seed(device) -> torch.Tensor:
    """One draw from torch's generator: the key of a uniform stream."""
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64, device=device)


def _rand_like(x, *, dtype=None, layout=None, device=None, pin_memory=None,
               memory_format=None):
    dtype, device = dtype or x.dtype, device or x.device
    like = x if (dtype, torch.device(device)) == (x.dtype, x.device) else \
        torch.zeros(x.shape, dtype=dtype, device=device)
    return torch.ops.retrograd.uniform(like, _seed(device), 0)


def _rand(size, *, generator=None, dtype=None, layout=None, device=None, pin_memory=None):
    if generator is not None:   # a generator of the caller's: leave it to torch
        return NotImplemented
    like = torch.zeros(size, dtype=dtype or torch.get_default_dtype(), device=device)
    return torch.ops.retrograd.uniform(like, _seed(like.device), 0)


#: Uniform draws become a seed and a pure function of it (retrograd/rng.py),
#: so that checkpoint placement can recompute them -- a dropout mask -- in
#: the backward instead of saving them.
RANDOM = {aten.rand_like.default: _rand_like, aten.rand.default: _rand}


@functools.lru_cache(maxsize=None)
def decomposition_table() -> dict:
    import retrograd.rng  # noqa: F401  (registers retrograd::uniform)
    table = dict(torch._decomp.core_aten_decompositions())
    table.update(torch._decomp.get_decompositions(EXTRA))
    table.update(RANDOM)
    return table
