"""The ``out=`` overload of an op the torch program calls by its entry point.

Ops without a torch function (``gelu_backward``, which the CPU default keeps
whole: ``decompositions.TORCH_WHOLE``) are called through their overload's
C++ entry point (``torch_calls.py``), which has no ``out=``. Their ATen
out overload does (``aten.gelu_backward.grad_input(g, x, grad_input=g)``),
so ``torch_liveness`` can write such a pointwise result over an operand that
dies there, as it writes ``torch.mul(a, b, out=a)``. Without it the LoRA
step's whole GELU backward allocated its [2, 8, 128] result beside the
gradient it reads, where the decomposed chain wrote over it: 57,616 ->
59,656 bytes at the peak (commit bc8ef05).
"""

from __future__ import annotations

import torch
from retrograd.codegen.torch_calls import _meta, _meta_operands, _same
from torch import fx

__all__ = ["out_overload"]


def _out_argument(overload: torch._ops.OpOverload, base: torch._ops.OpOverload) -> str | None:
    """The name of ``overload``'s one written, keyword-only tensor argument when
    its other arguments are ``base``'s (names and types), else None."""
    arguments = overload._schema.arguments
    written = [a for a in arguments if a.alias_info is not None and a.alias_info.is_write]
    if len(written) != 1 or not written[0].kwarg_only:
        return None
    rest = [(a.name, str(a.type)) for a in arguments if a is not written[0]]
    if rest != [(a.name, str(a.type)) for a in base._schema.arguments]:
        return None
    return written[0].name


def out_overload(node: fx.Node, operand: fx.Node) -> tuple[str, str] | None:
    """``("aten.<op>.<overload>", "<out argument>")``: the aten overload that,
    called with ``node``'s arguments and its out argument ``operand``, writes
    there and returns what ``node``'s overload returns (checked on meta
    tensors), or None."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return None
    packet = target.overloadpacket
    for name in packet.overloads():
        overload = getattr(packet, name)
        argument = _out_argument(overload, target) if overload is not target else None
        if argument is None:
            continue
        try:
            args, kwargs, _ = _meta_operands(node)
            expected = target(*args, **kwargs)
            args, kwargs, metas = _meta_operands(node)   # fresh: the out overload writes
            out = metas[operand] if operand in metas else _meta(operand)
            got = overload(*args, **kwargs, **{argument: out})
        except Exception:   # noqa: BLE001, S112 -- any refusal means: no out overload
            continue
        if got is out and _same(expected, got):
            return f"aten.{target._opname}.{name}", argument
    return None
