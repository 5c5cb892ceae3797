"""``compile_step`` on an FSDP2 model (``fully_shard`` per block and the root).

FSDP2 keeps each parameter as a ``DTensor`` sharded on dim 0 and gathers it
in forward and backward hooks, which a functional trace never runs (tracing
the wrapper would compute each rank's loss on its shard alone). So the step
unwraps it (``ShardView``):

- the step's parameters are the *local shards* (plain ``nn.Parameter``\\ s
  aliasing each DTensor's local tensor, so an update written into them is
  the FSDP2 parameter's update); the optimizer's ``param_groups`` are
  rebound to them (its state, if any, moved over as local tensors), so the
  optimizer state is sharded exactly as FSDP2's is;
- inside the step program, before the forward, each FSDP2 unit's shards
  (the root's first, then each ``fully_shard``-ed block in registration
  order) are zero-padded to FSDP2's chunk, flattened and all-gathered by one
  functional all-gather per unit, then split back into full parameters; the
  forward and backward run on those (with FSDP2's hooks off);
- after the backward, each unit's full gradients (last unit first, as they
  become final) are padded, laid out rank by rank and reduce-scattered by
  one functional reduce-scatter per unit, times ``1 / world_size`` (FSDP2's
  default average): each rank gets its own shard's gradient;
- the optimizer update (and a ``max_grad_norm`` clip, whose norm is summed
  across ranks) runs on the local shards only.

Where a unit reshards after its forward (``reshard_after_forward``; the
root left at FSDP2's default does not), its gathered parameters are marked
(``FSDP_UNIT``, ``RESHARD``: passes/planning/collectives.py) and the
checkpoint pass recomputes them for the backward, never saves them: a
second all-gather just before the unit's backward, the same on every rank
(values computed from those parameters and an activation are saved, never
recomputed: collectives.reads_regathered).
The schedule issues each unit's all-gather one unit ahead, no earlier
(``collectives.bound_gathers``), waits where its parameters are first read,
and issues each reduce-scatter as soon as its unit's gradients are final.

FSDP2's ``MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=...)``
is mirrored as FSDP2 does it: each fp32 shard is cast to bf16 before its
all-gather (the forward and backward then run in bf16 on the gathered
parameters), FSDP2 modules' floating-point inputs are cast to bf16 (its
``cast_forward_inputs``, a pre-hook while tracing), each gradient is cast to
``reduce_dtype`` (None: stays bf16) before its reduce-scatter and the shard
back to fp32 after it; the update runs on the fp32 shards, so master weights
and optimizer state stay fp32. float16, ``output_dtype``,
``cast_forward_inputs=False`` and ``reduce_dtype`` without ``param_dtype``
are refused by name, as are CPU offload policies, meshes of more than one
dimension, placements other than ``Shard(0)`` and parameters that are not
DTensors.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import traceback as fx_traceback

from retrograd.errors import UnsupportedError
from retrograd.fsdp_policy import cast_forward_inputs, check_policy, policy_dtypes
from retrograd.passes.planning.collectives import FSDP_REDUCE, FSDP_UNIT, RESHARD

__all__ = ["Layout", "ShardView", "is_fsdp2", "unwrap_fsdp2"]

_C10D = torch.ops._c10d_functional


def is_fsdp2(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:   # pragma: no cover - torch without distributed
        return False
    return isinstance(model, FSDPModule)


@dataclass(frozen=True)
class Param:
    """One sharded parameter: its full shape and FSDP2's chunk rows."""

    name: str
    full: torch.Size
    chunk: int        # rows per rank after padding: ceil(dim 0 / world size)
    unit: int         # index of its FSDP2 unit in forward order
    param_dtype: torch.dtype | None = None    # MixedPrecisionPolicy: gathered and computed in
    reduce_dtype: torch.dtype | None = None   # reduce-scattered in (None: the gradient's own)


@dataclass(frozen=True)
class Layout:
    """The sharded parameters (in ``named_parameters`` order) and the group."""

    params: tuple[Param, ...]
    units: int
    group: Any
    world_size: int
    rank: int
    reshard: tuple[bool, ...] = ()   # per unit: freed after its forward, gathered again

    def unshard(self, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        """Full parameters from local shards: one all-gather per unit and
        dtype (traced). Each unit's nodes are marked (``FSDP_UNIT``, and
        ``RESHARD`` where the unit reshards after its forward) for the
        checkpoint pass and the schedule (passes/planning/collectives.py)."""
        full: list[Any] = [None] * len(shards)
        for unit in range(self.units):
            marks = {FSDP_UNIT: unit, RESHARD: self.reshard[unit]}
            with fx_traceback.annotate(marks):
                cast = [self._cast(i, shards[i]) for i in range(len(shards))]
                for members in _by_dtype(self._members(unit), cast):
                    for i, value in zip(members, self._gather(members, cast)):
                        full[i] = value
        return full

    def _cast(self, index: int, shard: torch.Tensor) -> torch.Tensor:
        """The shard as FSDP2 gathers it: cast to the policy's
        ``param_dtype`` before the all-gather (the sharded fp32 master
        weight itself is never changed)."""
        dtype = self.params[index].param_dtype
        return shard if dtype is None else shard.to(dtype)

    def _gather(self, members: list[int], shards: list[torch.Tensor]) -> list[torch.Tensor]:
        """The full parameters ``members`` (one dtype of one unit) by one
        functional all-gather of their padded, flattened shards."""
        padded = [_pad(shards[i], self.params[i].chunk) for i in members]
        flat = torch.cat([p.reshape(-1) for p in padded])
        gathered = _C10D.wait_tensor(_C10D.all_gather_into_tensor(
            flat, self.world_size, self.group.group_name))
        parts: list[list[torch.Tensor]] = [[] for _ in members]
        for chunk in gathered.chunk(self.world_size):
            for k, piece in enumerate(chunk.split([p.numel() for p in padded])):
                parts[k].append(piece.view(padded[k].shape))
        return [torch.cat(pieces).narrow(0, 0, self.params[i].full[0])
                for i, pieces in zip(members, parts)]

    def reduce_scatter(self, grads: list[torch.Tensor], used: tuple[int, ...],
                       shards: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each used parameter's shard of the gradient averaged across ranks:
        one reduce-scatter per unit and reduce dtype, last unit first
        (traced). As FSDP2's mixed precision does, each gradient is cast to
        its ``reduce_dtype`` before the reduce-scatter and the shard back to
        the sharded parameter's dtype after it."""
        position = {index: k for k, index in enumerate(used)}
        out: list[Any] = [None] * len(used)
        for unit in reversed(range(self.units)):
            reached = [i for i in self._members(unit) if i in position]
            reduced = [self._to_reduce(i, grads[position[i]]) if i in position else None
                       for i in range(len(shards))]
            for members in _by_dtype(reached, reduced):
                rows = [_pad(reduced[i], self.params[i].chunk * self.world_size)
                        for i in members]
                per_rank = [r.reshape(self.world_size, -1) for r in rows]
                flat = torch.cat([p[rank] for rank in range(self.world_size) for p in per_rank])
                with fx_traceback.annotate({FSDP_REDUCE: unit}):
                    mine = _C10D.wait_tensor(_C10D.reduce_scatter_tensor(
                        flat * (1.0 / self.world_size), "sum", self.world_size,
                        self.group.group_name))
                for i, piece in zip(members, mine.split([p.shape[1] for p in per_rank])):
                    local = shards[i]
                    shape = (self.params[i].chunk,) + tuple(local.shape[1:])
                    out[position[i]] = (piece.view(shape).narrow(0, 0, local.shape[0])
                                        .to(local.dtype))
        return out

    def _to_reduce(self, index: int, grad: torch.Tensor) -> torch.Tensor:
        dtype = self.params[index].reduce_dtype
        return grad if dtype is None else grad.to(dtype)

    def _members(self, unit: int) -> list[int]:
        return [i for i, p in enumerate(self.params) if p.unit == unit]


def _by_dtype(members: list[int], tensors: list[torch.Tensor]) -> list[list[int]]:
    groups: dict[torch.dtype, list[int]] = {}
    for i in members:
        groups.setdefault(tensors[i].dtype, []).append(i)
    return list(groups.values())


def _pad(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``tensor`` with zero rows appended up to ``rows`` on dim 0."""
    missing = rows - tensor.shape[0]
    if not missing:
        return tensor
    return torch.cat([tensor, tensor.new_zeros((missing,) + tuple(tensor.shape[1:]))])


class ShardView(nn.Module):
    """The module the step traces: the FSDP2 model's local shards as its
    parameters and the model's buffers as its buffers (names with ``.``
    spelled ``__``); ``forward`` runs the FSDP2 model, hooks off, on the full
    parameters it is given (the step gathers them) or, when handed the local
    shards themselves (the step's probe for which parameters a loss reaches),
    on stand-ins of the full shape built from them."""

    def __init__(self, root: nn.Module, named: list[tuple[str, nn.Parameter]],
                 layout: Layout):
        super().__init__()
        object.__setattr__(self, "root", root)   # not a submodule: its DTensors stay out
        self.names = [name for name, _ in named]
        self.layout = layout
        for name, param in named:
            local = nn.Parameter(param._local_tensor, requires_grad=param.requires_grad)
            self.register_parameter(_flat(name), local)
        self.buffer_names = [name for name, _ in root.named_buffers()]
        for name, buffer in root.named_buffers():
            self.register_buffer(_flat(name), buffer)
        self.training = root.training

    def forward(self, *args, **kwargs):
        given = [getattr(self, _flat(name)) for name in self.names]
        full = [value if value.shape == spec.full else _stand_in(value, spec)
                for value, spec in zip(given, self.layout.params)]
        full = [value if spec.param_dtype is None else value.to(spec.param_dtype)
                for value, spec in zip(full, self.layout.params)]
        state = dict(zip(self.names, full))
        state.update({name: getattr(self, _flat(name)) for name in self.buffer_names})
        with hooks_off(self.root), cast_forward_inputs(_fsdp_modules(self.root)):
            return torch.func.functional_call(self.root, state, args, kwargs)


def _fsdp_modules(root: nn.Module) -> list[nn.Module]:
    """The FSDP2 modules of ``root`` (itself first), in the units' order."""
    return [module for module in root.modules() if is_fsdp2(module)]


def _flat(name: str) -> str:
    return name.replace(".", "__")


def _stand_in(local: torch.Tensor, spec: Param) -> torch.Tensor:
    """A tensor of the full shape computed from ``local`` (its values are
    not the full parameter's): enough to find what the loss reaches."""
    padded = _pad(local, spec.chunk)
    return padded.repeat((len(range(0, spec.full[0], spec.chunk)),)
                         + (1,) * (local.dim() - 1)).narrow(0, 0, spec.full[0])


@contextlib.contextmanager
def hooks_off(root: nn.Module):
    """FSDP2's forward pre- and post-hooks removed from every FSDP2 module
    of ``root`` while tracing (restored after, in their order)."""
    saved = []
    for module in root.modules():
        if not is_fsdp2(module):
            continue
        state = module._get_fsdp_state()
        ids = set()
        for attribute in ("_pre_forward_hook_handle", "_post_forward_hook_handle"):
            handle = getattr(state, attribute, None)
            for one in getattr(handle, "handles", [handle]):
                if one is not None:
                    ids.add(one.id)
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            saved.append((hooks, dict(hooks)))
            for key in ids & set(hooks):
                del hooks[key]
    try:
        yield
    finally:
        for hooks, before in saved:
            hooks.clear()
            hooks.update(before)


def _check(root: nn.Module, named) -> Any:
    """The mesh every parameter is sharded over; refusals name what to change."""
    from torch.distributed.tensor import DTensor, Shard
    mesh = None
    for name, param in named:
        if not isinstance(param, DTensor):
            raise UnsupportedError(
                f"retrograd.compile_step: parameter {name!r} of the FSDP2 model is not sharded "
                "(call fully_shard on the module that holds it, or on the root)")
        if not param.requires_grad:
            raise UnsupportedError(
                f"retrograd.compile_step: FSDP2 parameter {name!r} is frozen; frozen "
                "parameters of an FSDP2 model are not supported")
        if param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
            raise UnsupportedError(
                f"retrograd.compile_step: FSDP2 parameter {name!r} is placed "
                f"{param.placements} on a {param.device_mesh.ndim}-D mesh; only Shard(0) on a "
                "1-D mesh (plain fully_shard) is supported")
        mesh = mesh or param.device_mesh
    for module in root.modules():
        if not is_fsdp2(module):
            continue
        state = module._get_fsdp_state()
        check_policy(state._mp_policy)
        for group in state._fsdp_param_groups:
            if group.offload_policy.__class__.__name__ != "OffloadPolicy":
                raise UnsupportedError("retrograd.compile_step: FSDP2's CPUOffloadPolicy is "
                                       "not supported")
    return mesh


def _units(root: nn.Module, names: list[str]) -> list[int]:
    """Each parameter's FSDP2 unit: its nearest fully_shard-ed ancestor,
    numbered in forward order (the root first, then registration order)."""
    prefixes = [name for name, module in root.named_modules() if is_fsdp2(module)]
    order = {prefix: k for k, prefix in enumerate(prefixes)}

    def owner(name: str) -> str:
        found = [p for p in prefixes if p == "" or name.startswith(p + ".")]
        return max(found, key=len)
    return [order[owner(name)] for name in names]


def unwrap_fsdp2(model: nn.Module, optimizer: Any) -> tuple[ShardView, Layout]:
    """The module to trace and the sharding layout; rebinds ``optimizer``'s
    parameters to the local shards (module docstring)."""
    import torch.distributed as dist
    named = [(name, p) for name, p in model.named_parameters()]
    mesh = _check(model, named)
    group = mesh.get_group()
    world = dist.get_world_size(group)
    units = _units(model, [name for name, _ in named])
    policies = [module._get_fsdp_state()._mp_policy for module in _fsdp_modules(model)]
    params = tuple(Param(name, p.shape, -(-p.shape[0] // world), unit,
                         *policy_dtypes(policies[unit], p.dtype))
                   for (name, p), unit in zip(named, units))
    layout = Layout(params, max(units) + 1, group, world, dist.get_rank(group),
                    _reshards(model))
    view = ShardView(model, named, layout)
    _rebind(optimizer, {id(p): getattr(view, _flat(name)) for name, p in named})
    return view, layout


def _reshards(root: nn.Module) -> tuple[bool, ...]:
    """Per unit (forward order, as ``_units``): whether FSDP2 frees its
    gathered parameters after its forward and gathers them again for the
    backward (``reshard_after_forward``). As FSDP2's lazy init does, the
    root left at the default (``reshard_after_forward=None``) keeps its
    parameters: they would be gathered again at once for the backward."""
    found = []
    for module in root.modules():
        if not is_fsdp2(module):
            continue
        state = module._get_fsdp_state()
        groups = state._fsdp_param_groups
        infos = [g.post_forward_mesh_info for g in groups]
        if any(info is not None and info != g.mesh_info for info, g in zip(infos, groups)):
            raise UnsupportedError(
                "retrograd.compile_step: FSDP2's reshard_after_forward=<int> (resharding to a "
                "smaller world after the forward) is not supported; pass True or False")
        reshard = any(info is not None for info in infos)
        if module is root and getattr(state, "_auto_reshard_after_forward", False):
            reshard = False
        found.append(reshard)
    return tuple(found)


def _rebind(optimizer: Any, local: dict[int, nn.Parameter]) -> None:
    """The optimizer's DTensor parameters replaced by their local shards, and
    any state moved over as local tensors."""
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        for k, p in enumerate(group["params"]):
            shard = local.get(id(p))
            if shard is None:
                continue
            group["params"][k] = shard
            state = optimizer.state.pop(p, None)
            if state:
                optimizer.state[shard] = {key: value.to_local() if hasattr(value, "to_local")
                                          else value for key, value in state.items()}
