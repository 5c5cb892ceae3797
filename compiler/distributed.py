"""``compile_step`` on a ``DistributedDataParallel`` model (or with
``process_group=``), and the setups it refuses.

``compile_step(DDP(model), loss_fn, optimizer)`` cannot trace DDP itself: DDP
averages gradients in autograd hooks on its parameters' ``AccumulateGrad``
nodes, which a functional trace (``grad_and_value`` over reparametrized
parameters) never reaches, and its ``forward`` opens a profiler range whose
handle is not a tensor (``profiler._record_function_enter_new``: the
``KeyError`` compile_step used to fail with, in codegen). Tracing it would
give each rank its *local* gradients, a silently wrong update.

So the step unwraps DDP and averages the gradients itself, inside the
program, as DDP does: gradients packed into buckets of DDP's
``bucket_cap_mb`` (``buckets.py``), each bucket multiplied by
``1 / world_size`` and summed across ranks by a functional all-reduce
(``_c10d_functional.all_reduce``, traced into the graph and run as an extern
call). The schedule pass issues each all-reduce as soon as its bucket is
filled and waits for it only where the update first reads it, so the
communication overlaps the rest of the backward. The gradient clip and the
optimizer update then run on the averaged gradients, in the same program.
Buffers are broadcast from rank 0 before each step, as DDP's
``broadcast_buffers`` does before each forward. A step called inside
``no_sync()`` is refused (DDP would average the accumulated ``.grad`` later).
``compile_step(model, ..., process_group=group, bucket_cap_mb=...)`` does the
same without the wrapper (rank 0's parameters and buffers copied to every
rank when the step is built, as DDP does when it wraps).

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

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from retrograd import zero
from retrograd.buckets import Limits, all_reduce
from retrograd.errors import UnsupportedError
from retrograd.fsdp import is_fsdp2, unwrap_fsdp2
from retrograd.optimizers import clip_gradients

__all__ = ["Replicas", "check_same_parameters", "refuse_for_compile", "unwrap"]

_INSTEAD = ("use DDP(torch.compile(model, backend=\"retrograd\")) for DDP, or "
            "block.compile(backend=\"retrograd\") before fully_shard(block) for FSDP2 "
            "(docs/distributed.md)")


@dataclass(frozen=True)
class Replicas:
    """The data-parallel group a model's gradients are averaged over: DDP's,
    or ``compile_step(process_group=...)``'s (``wrapper`` None)."""

    group: Any
    world_size: int
    module: torch.nn.Module   # the model traced: its buffers are broadcast
    limits: Limits            # bucket sizes (buckets.py)
    wrapper: Any = None       # the DistributedDataParallel module: its no_sync() flag
    broadcast_buffers: bool = True
    rank: int = 0             # this rank in ``group``
    shard_state: bool = False   # ZeRO-1 (zero.py): each rank updates its own parameters
    layout: Any = None          # FSDP2 (fsdp.py): parameters are local shards

    def unshard(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The parameters the forward runs on: under FSDP2 the local shards
        all-gathered (one functional all-gather per unit, traced), else
        ``params`` themselves."""
        return params if self.layout is None else self.layout.unshard(params)

    def _owners(self, parameters) -> list[int]:
        return zero.owners([p.numel() for p in parameters], self.world_size)

    def owned(self, used: tuple[int, ...], parameters) -> tuple[int, ...]:
        """The parameters of ``used`` this rank updates (and keeps optimizer
        state of): all of them, or its share under ZeRO-1. Owners are chosen
        over every trainable parameter, so a parameter keeps its owner (and
        its state) in signatures whose loss reaches fewer parameters."""
        if not self.shard_state:
            return used
        owner = self._owners(parameters)
        return tuple(i for i in used if owner[i] == self.rank)

    def average(self, grads: list[torch.Tensor], used: tuple[int, ...],
                parameters) -> list[torch.Tensor | None]:
        """Each gradient (one per index of ``used``) averaged across the
        group, as DDP does (times ``1 / world_size``, then summed), traced
        into the step's graph: one functional all-reduce per bucket
        (``buckets.py``); under ZeRO-1 one reduce-scatter per bucket, which
        gives this rank its own parameters' gradients only (None for the
        others, ``zero.py``)."""
        if self.layout is not None:   # FSDP2: each rank's shard of the gradients
            return self.layout.reduce_scatter(grads, used, parameters)
        if not self.shard_state:
            return all_reduce(grads, self.group, self.world_size, self.limits)[0]
        owner = self._owners(parameters)
        return zero.reduce_scatter(grads, [owner[i] for i in used], self.rank, self.group,
                                   self.world_size, self.limits)

    def clip(self, grads: list, max_norm: float, used: tuple[int, ...], parameters) -> list:
        """``clip_grad_norm_`` of the averaged gradients; under ZeRO-1 the
        norm's sum spans the ranks (``zero.clip``)."""
        if not self.shard_state and self.layout is None:
            return clip_gradients(grads, max_norm)
        return zero.clip(grads, max_norm, [parameters[i] for i in used], self.group)

    def share(self, values: list[torch.Tensor], used: tuple[int, ...],
              parameters) -> list[torch.Tensor]:
        """Under ZeRO-1, each updated parameter (``values``, one per index of
        ``used``) sent from its owner to every rank: one all-gather per dtype
        (traced)."""
        if not self.shard_state:
            return values
        owner = self._owners(parameters)
        return zero.gather(values, [owner[i] for i in used], self.rank, self.group,
                           self.world_size)

    def before_step(self) -> None:
        """Refuse DDP's ``no_sync()``, then broadcast rank 0's buffers
        (BatchNorm's running statistics), as DDP's ``broadcast_buffers=True``
        does before each forward."""
        if self.wrapper is not None and not self.wrapper.require_backward_grad_sync:
            raise UnsupportedError(
                "retrograd.compile_step: DDP's no_sync() is not supported (the step averages "
                "the gradients of every call; DDP would average the accumulated .grad "
                "later); accumulate micro-batches inside loss_fn, or use "
                "DDP(torch.compile(model, backend=\"retrograd\")) with no_sync")
        if self.layout is not None:   # the view follows the FSDP2 model's train/eval
            self.module.training = self.module.root.training
        if self.broadcast_buffers:
            self.broadcast([buffer for _, buffer in self.module.named_buffers()])

    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """``tensors`` overwritten with rank 0's, in place."""
        import torch.distributed as dist
        if not tensors:
            return
        source = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        with torch.no_grad():
            for tensor in tensors:
                dist.broadcast(tensor, src=source, group=self.group)

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


def unwrap(model: torch.nn.Module, process_group: Any = None,
           bucket_cap_mb: float | None = None, shard_optimizer_state: bool = False,
           optimizer: Any = None) -> tuple[torch.nn.Module, Replicas | None]:
    """``(module to trace, replicas or None)``: a DDP model's inner module and
    its group; a bare model with ``process_group=`` itself and that group;
    any other model itself. Raises ``UnsupportedError`` for a wrapper or DDP
    option the step cannot run; ``shard_optimizer_state`` (ZeRO-1) needs a
    group and an optimizer."""
    if is_fsdp2(model):
        return _fsdp2(model, process_group, bucket_cap_mb, shard_optimizer_state, optimizer)
    module, replicas = _unwrap(model, process_group, bucket_cap_mb)
    if shard_optimizer_state is not True and shard_optimizer_state is not False:
        raise ValueError("retrograd.compile_step: shard_optimizer_state must be True or False, "
                         f"got {shard_optimizer_state!r}")
    if shard_optimizer_state and (replicas is None or optimizer is None):
        raise ValueError("retrograd.compile_step: shard_optimizer_state=True (ZeRO-1) needs an "
                         "optimizer and a group: a DDP model or process_group=")
    if shard_optimizer_state:
        import torch.distributed as dist
        replicas = dataclasses.replace(replicas, rank=dist.get_rank(replicas.group),
                                       shard_state=True)
    return module, replicas


def _fsdp2(model: torch.nn.Module, process_group: Any, bucket_cap_mb: float | None,
           shard_optimizer_state: bool, optimizer: Any) -> tuple[torch.nn.Module, Replicas]:
    """An FSDP2 root: its local shards traced, gathered and reduce-scattered
    in the program (``fsdp.py``)."""
    if process_group is not None or bucket_cap_mb is not None or shard_optimizer_state:
        raise UnsupportedError(
            "retrograd.compile_step: process_group=, bucket_cap_mb= and "
            "shard_optimizer_state= are not for an FSDP2 model (fully_shard's mesh is its "
            "group; its optimizer state is already sharded)")
    _require_process_group("the model is FSDP2 (fully_shard)")
    _refuse_wrappers(model, fsdp2=True)
    if optimizer is None:
        raise UnsupportedError(
            "retrograd.compile_step: an FSDP2 model needs an optimizer (without one the step "
            "would leave each rank's gradient shard on a view of the shards, not on the "
            "DTensor parameters' .grad); pass the optimizer to compile_step")
    view, layout = unwrap_fsdp2(model, optimizer)
    replicas = Replicas(layout.group, layout.world_size, view, Limits.from_megabytes(None),
                        broadcast_buffers=False, rank=layout.rank, layout=layout)
    return view, replicas


def _unwrap(model: torch.nn.Module, process_group: Any,
            bucket_cap_mb: float | None) -> tuple[torch.nn.Module, Replicas | None]:
    _refuse_wrappers(model)
    from torch.nn.parallel import DistributedDataParallel
    if not isinstance(model, DistributedDataParallel):
        return _bare(model, process_group, bucket_cap_mb)
    if process_group is not None or bucket_cap_mb is not None:
        raise UnsupportedError(
            "retrograd.compile_step: process_group= and bucket_cap_mb= are for a model not "
            "wrapped in DDP; a DDP model's own process_group and bucket_cap_mb are used "
            "(pass them to DistributedDataParallel(...))")
    _require_process_group()
    if model._comm_hooks or getattr(model, "_comm_hook", None) is not None:
        raise UnsupportedError("retrograd.compile_step: DDP with a communication hook "
                               "(register_comm_hook) is not supported; " + _INSTEAD)
    if getattr(model, "mixed_precision", None) is not None:
        raise UnsupportedError("retrograd.compile_step: DDP's mixed_precision option is not "
                               "supported; use torch.autocast in loss_fn, or " + _INSTEAD)
    import torch.distributed as dist
    group = model.process_group
    replicas = Replicas(group, dist.get_world_size(group), model.module, Limits.of_ddp(model),
                        model, bool(model.broadcast_buffers))
    return model.module, replicas


def _bare(model: torch.nn.Module, process_group: Any,
          bucket_cap_mb: float | None) -> tuple[torch.nn.Module, Replicas | None]:
    """``compile_step(model, ..., process_group=group)``: DDP's semantics
    without its wrapper (parameters and buffers from rank 0 when the step is
    built, buffers again before each step, gradients averaged in buckets)."""
    if process_group is None:
        if bucket_cap_mb is not None:
            raise ValueError("retrograd.compile_step: bucket_cap_mb= needs process_group= "
                             "(or a DDP model, which has its own)")
        return model, None
    _require_process_group("process_group= was given")
    import torch.distributed as dist
    if not isinstance(process_group, dist.ProcessGroup):
        raise UnsupportedError(
            "retrograd.compile_step: process_group= must be a torch.distributed.ProcessGroup "
            f"(torch.distributed.group.WORLD, or one from new_group), got "
            f"{type(process_group).__name__}")
    limits = Limits.from_megabytes(bucket_cap_mb)
    return model, Replicas(process_group, dist.get_world_size(process_group), model, limits)


def _refuse_wrappers(model: torch.nn.Module, fsdp2: bool = False) -> None:
    """DataParallel, FSDP1 and FSDP2 anywhere in ``model`` (FSDP2 allowed
    when ``fsdp2``: the root is fully_shard-ed); DDP below the top."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel
    for name, module in model.named_modules():
        where = f" (at {name!r})" if name else ""
        if isinstance(module, DataParallel):
            raise UnsupportedError(
                f"retrograd.compile_step: torch.nn.DataParallel{where} is not supported; "
                "use one process per device with DistributedDataParallel: "
                "compile_step(DDP(model), ...), or " + _INSTEAD)
        kind = _fsdp_kind(module)
        if kind and not (fsdp2 and kind.endswith("(FSDP2)")):
            how = ("; call fully_shard on the root too: compile_step(fully_shard(model), ...)"
                   if kind.endswith("(FSDP2)") else "")
            raise UnsupportedError(f"retrograd.compile_step: {kind}{where} is not supported "
                                   "(its parameters are shards gathered by hooks a "
                                   "functional trace does not run)" + how + "; " + _INSTEAD)
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


def _require_process_group(why: str = "the model is DistributedDataParallel") -> None:
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise UnsupportedError(
            f"retrograd.compile_step: {why} but no process group is initialised; call "
            "torch.distributed.init_process_group(...) (torchrun sets its environment) on "
            "every rank before compile_step, and destroy it after")


def _signature(model: torch.nn.Module, replicas: Replicas) -> list[tuple]:
    """(name, shape, dtype) of each trainable parameter; of an FSDP2 model
    the full (unsharded) shapes, which every rank's shards must share (a
    rank's own shard may be shorter: uneven dim-0 chunks)."""
    if replicas.layout is not None:
        shards = [p for _, p in model.named_parameters()]
        return [(spec.name, tuple(spec.full), str(shard.dtype))
                for spec, shard in zip(replicas.layout.params, shards)]
    return [(name, tuple(p.shape), str(p.dtype)) for name, p in model.named_parameters()
            if p.requires_grad]


def check_same_parameters(model: torch.nn.Module, replicas: Replicas) -> None:
    """Every rank's trainable parameters have the same names, shapes and
    dtypes (an FSDP2 model's full shapes); otherwise the first all-reduce or
    all-gather would hang or mix values, so this raises naming the first
    difference. Then, under ``process_group=``,
    rank 0's parameters and buffers are copied to every rank, as DDP does
    when it wraps a model."""
    mine = _signature(model, replicas)
    gathered = replicas.gather(mine)
    for rank, theirs in enumerate(gathered):
        if theirs == mine:
            continue
        first = next((f"{a} on this rank, {b} on rank {rank}"
                      for a, b in zip(mine, theirs) if a != b),
                     f"{len(mine)} trainable parameters on this rank, {len(theirs)} on rank "
                     f"{rank}")
        kind = "FSDP2" if replicas.layout is not None else "DDP"
        raise UnsupportedError(f"retrograd.compile_step: the {kind} model's parameters differ "
                               f"across ranks: {first} (name, shape, dtype); build the same "
                               "model on every rank")
    # DDP broadcast them when it wrapped the model; FSDP2's shards differ by design
    if replicas.wrapper is None and replicas.layout is None:
        replicas.broadcast([tensor.detach() for tensor in model.parameters()]
                           + list(model.buffers()))
