"""``compile_step`` on a ``DistributedDataParallel`` model, and the setups it refuses.

``compile_step(DDP(model), loss_fn, optimizer)`` cannot trace DDP itself: DDP
averages gradients in autograd hooks on its parameters' ``AccumulateGrad``
nodes, which a functional trace (``grad_and_value`` over reparametrized
parameters) never reaches, and its ``forward`` opens a profiler range whose
handle is not a tensor (``profiler._record_function_enter_new``: the
``KeyError`` compile_step used to fail with, in codegen). Tracing it would
give each rank its *local* gradients, a silently wrong update.

So the step unwraps DDP and averages the gradients itself, inside the
program, as DDP does: each gradient is multiplied by ``1 / world_size`` and
summed across ranks with one all-reduce per gradient dtype (a functional
collective, ``_c10d_functional.all_reduce``, traced into the graph and run as
an extern call; it is waited for at once, so nothing overlaps yet). The
gradient clip and the optimizer update then run on the averaged gradients,
in the same program. Buffers are broadcast from rank 0 before each step, as
DDP's ``broadcast_buffers`` does before each forward. A step called inside
``no_sync()`` is refused (DDP would average the accumulated ``.grad`` later).

Which parameters a signature's loss reaches is agreed across ranks (their
union, as DDP's ``find_unused_parameters`` gives: a parameter reached on any
rank is averaged, with zeros from the others), so every rank issues the same
all-reduces. That agreement is an all-gather when a signature is first seen:
every rank must call the step with the same batch shapes (as
``DistributedSampler(drop_last=True)`` gives).

Refused with a clear error: no initialised process group, a model whose
parameters differ across ranks (an all-gather of each rank's parameter names,
shapes and dtypes, instead of a hang in the first all-reduce), DDP options the
step does not implement (communication hooks, DDP's mixed precision), and
wrappers it cannot unwrap (``DataParallel``, FSDP1, FSDP2's ``fully_shard``):
docs/distributed.md lists what to use instead. ``retrograd.compile`` refuses
the same wrappers (``refuse_for_compile``): it compiles inside them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from retrograd.errors import UnsupportedError

__all__ = ["Replicas", "check_same_parameters", "refuse_for_compile", "unwrap"]

_INSTEAD = ("use DDP(torch.compile(model, backend=\"retrograd\")) for DDP, or "
            "block.compile(backend=\"retrograd\") before fully_shard(block) for FSDP2 "
            "(docs/distributed.md)")


@dataclass(frozen=True)
class Replicas:
    """The data-parallel group a DDP model's gradients are averaged over."""

    group: Any
    world_size: int
    wrapper: Any   # the DistributedDataParallel module: its no_sync() flag, its buffers

    def average(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each gradient averaged across the group, as DDP does (times
        ``1 / world_size``, then summed): one flat all-reduce per dtype, in
        order of first appearance, so every rank issues the same sequence.
        Traced into the step's graph."""
        import torch.distributed._functional_collectives as funcol
        buckets: dict[torch.dtype, list[int]] = {}
        for index, grad in enumerate(grads):
            buckets.setdefault(grad.dtype, []).append(index)
        averaged: list[Any] = [None] * len(grads)
        previous = None
        for members in buckets.values():
            parts = [grads[i].reshape(-1) for i in members]
            if previous is not None:   # an empty slice: orders this all-reduce after the last
                parts.append(previous[:0].to(parts[0].dtype))
            flat = torch.cat(parts) * (1.0 / self.world_size)
            total = funcol.all_reduce(flat, "sum", self.group)
            sizes = [grads[i].numel() for i in members]
            for i, piece in zip(members, torch.split(total, sizes)):
                averaged[i] = piece.view(grads[i].shape)
            previous = total
        return averaged

    def before_step(self) -> None:
        """Refuse ``no_sync()``, then broadcast rank 0's buffers (BatchNorm's
        running statistics), as DDP's ``broadcast_buffers=True`` does before
        each forward."""
        import torch.distributed as dist
        if not self.wrapper.require_backward_grad_sync:
            raise UnsupportedError(
                "retrograd.compile_step: DDP's no_sync() is not supported (the step averages "
                "the gradients of every call; DDP would average the accumulated .grad "
                "later); accumulate micro-batches inside loss_fn, or use "
                "DDP(torch.compile(model, backend=\"retrograd\")) with no_sync")
        buffers = [buffer for _, buffer in self.wrapper.module.named_buffers()]
        if not (self.wrapper.broadcast_buffers and buffers):
            return
        source = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        with torch.no_grad():
            for buffer in buffers:
                dist.broadcast(buffer, src=source, group=self.group)

    def agree(self, reached: tuple[int, ...], names: list[str]) -> tuple[int, ...]:
        """The union over ranks of the parameters the loss reaches."""
        gathered = self.gather(tuple(names[i] for i in reached))
        union = set().union(*gathered)
        return tuple(i for i, name in enumerate(names) if name in union)

    def gather(self, value) -> list:
        """Each rank's ``value`` (any picklable object), in rank order."""
        import torch.distributed as dist
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, value, group=self.group)
        return gathered


def unwrap(model: torch.nn.Module) -> tuple[torch.nn.Module, Replicas | None]:
    """``(module to trace, replicas or None)``: a DDP model's inner module and
    its group; any other model itself. Raises ``UnsupportedError`` for a
    wrapper or DDP option the step cannot run."""
    _refuse_wrappers(model)
    from torch.nn.parallel import DistributedDataParallel
    if not isinstance(model, DistributedDataParallel):
        return model, None
    _require_process_group()
    if model._comm_hooks or getattr(model, "_comm_hook", None) is not None:
        raise UnsupportedError("retrograd.compile_step: DDP with a communication hook "
                               "(register_comm_hook) is not supported; " + _INSTEAD)
    if getattr(model, "mixed_precision", None) is not None:
        raise UnsupportedError("retrograd.compile_step: DDP's mixed_precision option is not "
                               "supported; use torch.autocast in loss_fn, or " + _INSTEAD)
    import torch.distributed as dist
    group = model.process_group
    replicas = Replicas(group, dist.get_world_size(group), model)
    return model.module, replicas


def _refuse_wrappers(model: torch.nn.Module) -> None:
    """DataParallel, FSDP1 and FSDP2 anywhere in ``model``; DDP below the top."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel
    for name, module in model.named_modules():
        where = f" (at {name!r})" if name else ""
        if isinstance(module, DataParallel):
            raise UnsupportedError(
                f"retrograd.compile_step: torch.nn.DataParallel{where} is not supported; "
                "use one process per device with DistributedDataParallel: "
                "compile_step(DDP(model), ...), or " + _INSTEAD)
        kind = _fsdp_kind(module)
        if kind:
            raise UnsupportedError(f"retrograd.compile_step: {kind}{where} is not supported "
                                   "(its parameters are shards gathered by hooks a "
                                   "functional trace does not run); " + _INSTEAD)
        if name and isinstance(module, DistributedDataParallel):
            raise UnsupportedError(f"retrograd.compile_step: DistributedDataParallel{where} "
                                   "inside the model; wrap the whole model: "
                                   "compile_step(DDP(model), ...)")


def _fsdp_kind(module: torch.nn.Module) -> str:
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:   # pragma: no cover - torch without distributed
        return ""
    if isinstance(module, FullyShardedDataParallel):
        return "FullyShardedDataParallel (FSDP1)"
    if isinstance(module, FSDPModule):
        return "fully_shard (FSDP2)"
    return ""


def refuse_for_compile(model: torch.nn.Module) -> None:
    """``retrograd.compile(model)``: a DDP, FSDP or DataParallel module anywhere
    in ``model`` is refused (each communicates in hooks and a forward the
    trace does not keep; DDP's forward failed in codegen with ``KeyError:
    '_record_function_enter_new'``). Compiling inside the wrapper works."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel
    for name, module in model.named_modules():
        kind = _fsdp_kind(module) or ("DistributedDataParallel" if isinstance(
            module, DistributedDataParallel) else "torch.nn.DataParallel" if isinstance(
            module, DataParallel) else "")
        if kind:
            where = f" (at {name!r})" if name else ""
            raise UnsupportedError(
                f"retrograd.compile: {kind}{where} cannot be traced (it communicates in hooks "
                "a trace does not keep); compile the model inside the wrapper: "
                "DDP(retrograd.compile(model)), DDP(torch.compile(model, "
                "backend=\"retrograd\")), or retrograd.compile_step(DDP(model), ...) "
                "(docs/distributed.md)")


def _require_process_group() -> None:
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise UnsupportedError(
            "retrograd.compile_step: the model is DistributedDataParallel but no process "
            "group is initialised; call torch.distributed.init_process_group(...) (torchrun "
            "sets its environment) on every rank before compile_step, and destroy it after")


def check_same_parameters(model: torch.nn.Module, replicas: Replicas) -> None:
    """Every rank's trainable parameters have the same names, shapes and
    dtypes; otherwise the first all-reduce would hang or mix values, so this
    raises naming the first difference."""
    mine = [(name, tuple(p.shape), str(p.dtype)) for name, p in model.named_parameters()
            if p.requires_grad]
    gathered = replicas.gather(mine)
    for rank, theirs in enumerate(gathered):
        if theirs == mine:
            continue
        first = next((f"{a} on this rank, {b} on rank {rank}"
                      for a, b in zip(mine, theirs) if a != b),
                     f"{len(mine)} trainable parameters on this rank, {len(theirs)} on rank "
                     f"{rank}")
        raise UnsupportedError("retrograd.compile_step: the DDP model's parameters differ "
                               f"across ranks: {first} (name, shape, dtype); build the same "
                               "model on every rank")
