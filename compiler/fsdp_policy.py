"""FSDP2's ``MixedPrecisionPolicy`` as ``compile_step`` mirrors it
(compiler/fsdp.py): which policies it takes, each parameter's gather and
reduce dtypes, and the forward-input casts FSDP2's hooks would make."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from retrograd.errors import UnsupportedError

__all__ = ["cast_forward_inputs", "check_policy", "policy_dtypes"]


@contextlib.contextmanager
def cast_forward_inputs(modules: list[nn.Module]):
    """What FSDP2's pre-forward hooks (off while tracing) do under a
    ``MixedPrecisionPolicy`` with a ``param_dtype``: each FSDP2 module's
    (``modules``: the root and each block) floating-point inputs cast to it."""
    handles = []
    for module in modules:
        dtype = module._get_fsdp_state()._mp_policy.param_dtype
        if dtype is not None:
            handles.append(module.register_forward_pre_hook(
                functools.partial(_cast_inputs, dtype), with_kwargs=True, prepend=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _cast_inputs(dtype: torch.dtype, _module, args, kwargs):
    def cast(value):
        floating = isinstance(value, torch.Tensor) and value.is_floating_point()
        return value.to(dtype) if floating else value
    return tree_map(cast, args), tree_map(cast, kwargs)


#: FSDP2 ``param_dtype``s the step gathers in (its all-gather casts the shard
#: first); float16 is refused: FSDP2 divides its gradients before and after the
#: reduce-scatter for it (overflow), which the step does not mirror
PARAM_DTYPES = (torch.bfloat16,)
REDUCE_DTYPES = (torch.bfloat16, torch.float32)


def policy_dtypes(policy, shard_dtype: torch.dtype) -> tuple[Any, Any]:
    """(param_dtype, reduce_dtype) of a parameter, clamped as FSDP2's
    ``FSDPParam.init_dtype_attrs`` does: None where no cast happens."""
    param_dtype, reduce_dtype = policy.param_dtype, policy.reduce_dtype
    if reduce_dtype == param_dtype:
        reduce_dtype = None
    if param_dtype == shard_dtype or not shard_dtype.is_floating_point:
        param_dtype = None
    return param_dtype, reduce_dtype


def check_policy(policy) -> None:
    """Refuse, by name, the parts of a MixedPrecisionPolicy the step does
    not mirror."""
    def refuse(what: str) -> None:
        raise UnsupportedError(
            f"retrograd.compile_step: FSDP2's MixedPrecisionPolicy({what}) is not supported; "
            "param_dtype=torch.bfloat16 with reduce_dtype None, torch.bfloat16 or "
            "torch.float32 is; or use torch.autocast in loss_fn (docs/distributed.md)")
    if policy.param_dtype not in (None,) + PARAM_DTYPES:
        refuse(f"param_dtype={policy.param_dtype}")
    if policy.reduce_dtype not in (None,) + REDUCE_DTYPES:
        refuse(f"reduce_dtype={policy.reduce_dtype}")
    if policy.reduce_dtype is not None and policy.param_dtype is None:
        refuse(f"reduce_dtype={policy.reduce_dtype} without param_dtype")
    if policy.output_dtype is not None:
        refuse(f"output_dtype={policy.output_dtype}")
    if policy.param_dtype is not None and not policy.cast_forward_inputs:
        refuse("cast_forward_inputs=False")
