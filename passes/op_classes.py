"""What kind of op a node is: the classes every pass asks about, in one place.

In the manner of AOTAutograd's ``OpTypes`` (partitioners.py): the passes
decide by these predicates and sets, and none defines its own copy. A pass
that needs a new class adds it here; no pass imports another pass.

- views: ops whose result aliases their first argument (``is_view``), the
  subset that keeps row-major element order (``RESHAPE_OPS``,
  ``is_reshape``), and the walk from a view to the tensor it views
  (``view_base``); ``MEANING_VIEWS`` are views that change what the bits
  mean (conjugation, negation, real/complex), never no-ops;
- purity (``is_pure``): deterministic, no mutation, no side effect, so the
  op may be merged with a twin, recomputed, or dropped when unread;
- random ops (``is_random``): seeded draws, never merged nor recomputed;
- matrix products (``MATMULS``), convolutions (``CONVOLUTIONS``), ops with
  an ``output_mask`` (``MASKED_OPS``), extern ops with an ``out=`` overload
  the arena can write into (``OUT_VARIANTS``), extern ops that take
  workspace inside the call (``SCRATCH_OPS``);
- ``PHASE``: the node meta key saying "forward" or "backward" where one
  graph holds both (a compile_step program).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

__all__ = ["PHASE", "RECOMPUTED",
           "RESHAPE_OPS", "MEANING_VIEWS", "MATMULS", "CONVOLUTIONS", "MASKED_OPS",
           "OUT_VARIANTS", "SCRATCH_OPS", "is_view", "is_reshape", "view_base", "is_pure",
           "is_random", "same_sizes"]

aten = torch.ops.aten

#: Node meta key: "forward" or "backward" where one graph holds both (a
#: compile_step program, tagged by the checkpoint pass). Nodes of different
#: phases never share a kernel: a backward node fused into a forward kernel
#: would run -- and keep its value alive -- from the forward on, undoing
#: what checkpoint placement chose.
PHASE = "retrograd_phase"

#: Node meta key: set (to the recomputed node's name) on a checkpoint's
#: recomputation copy (``checkpoint.recompute_in_backward``); the schedule
#: runs a kernel of copies only when a reader needs it (``planning/lazy.py``).
RECOMPUTED = "retrograd_recomputed"

#: Aliasing ops that keep row-major element order: an in-kernel value read
#: through one of them is still the same register.
RESHAPE_OPS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default,
               aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims,
               aten.unsqueeze.default, aten.alias.default}

#: Views that change what the bits mean (conjugate, negative, real/complex
#: reinterpretation): never no-ops, even where shape, strides and dtype agree.
MEANING_VIEWS = {aten._conj.default, aten._neg_view.default, aten.view_as_real.default,
                 aten.view_as_complex.default, aten.conj.default}

#: Matrix products (2-d and batched).
MATMULS = {aten.mm.default, aten.bmm.default, aten.addmm.default}

#: Convolutions, forward and backward, by the name extern kernels carry.
CONVOLUTIONS = ("aten.convolution.default", "aten.convolution_backward.default")

#: Ops with an ``output_mask`` (last argument) choosing which results they compute.
MASKED_OPS = {aten.convolution_backward.default, aten.native_layer_norm_backward.default,
              aten.native_batch_norm_backward.default}

#: Extern ops that take workspace torch allocates inside the call (by name part):
#: the fused linear + cross-entropy holds one chunk of logits (compiler/loss_ops.py).
SCRATCH_OPS = ("convolution", "linear_cross_entropy")

#: Extern ops run with ``out=`` into the arena: op name -> the ``out`` argument.
OUT_VARIANTS = {"aten.mm.default": "out", "aten.bmm.default": "out",
                "aten.addmm.default": "out"}


def is_view(node: fx.Node) -> bool:
    """True for ops whose result aliases their first argument's storage."""
    if node.op != "call_function":
        return False
    if node.target in RESHAPE_OPS:
        return True
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.returns:
        return False
    alias = schema.returns[0].alias_info
    return alias is not None and not alias.is_write and not schema.is_mutable


def _numel(node: Any) -> int | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.numel() if isinstance(val, torch.Tensor) else None


def is_reshape(node: fx.Node) -> bool:
    """A row-major reshape of its input (same element count, same order)."""
    return node.op == "call_function" and node.target in RESHAPE_OPS and isinstance(
        node.args[0], fx.Node) and _numel(node) is not None and _numel(node) == _numel(
        node.args[0])


def view_base(node: fx.Node, through_items: bool = False) -> fx.Node:
    """The tensor a chain of views starts from (``permute(permute(x))`` -> x);
    with ``through_items`` an item of a multi-output view (``split(x)[0]``)
    is followed to ``x`` as well."""
    while (is_view(node) or through_items and node.target is operator.getitem) \
            and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def is_random(node: fx.Node) -> bool:
    """A seeded random draw (``rand``, ``bernoulli``, ``native_dropout``)."""
    return torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ())


def is_pure(node: fx.Node) -> bool:
    """A call whose result depends on its arguments alone and that changes
    nothing: no random draw, no mutable schema, not impure to fx. Such a node
    may be merged with a twin, recomputed in the backward, or dropped."""
    if node.op != "call_function" or node.is_impure() or is_random(node):
        return False
    schema = getattr(node.target, "_schema", None)
    return schema is None or not schema.is_mutable


def same_sizes(a, b) -> bool:
    """Equal sequences of sizes (or one size each), known without a guard: a
    symbolic size (``s0``) equals another only where that holds at every
    size, so a pass on a symbolic graph fixes no size (compiler/symbolic_passes.py)."""
    if not isinstance(a, (tuple, list)):
        a, b = (a,), (b,)
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))
