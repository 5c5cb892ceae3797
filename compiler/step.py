"""``retrograd.compile_step``: a whole training step as one program.

``step = compile_step(model, loss_fn, optimizer)`` returns ``step(*batch) ->
loss``. The step -- forward, loss, backward with the loss tangent folded as
the constant 1, and the optimizer's update -- is traced once per signature
with ``make_fx`` over ``torch.func.grad_and_value`` (functionalized, buffers
such as BatchNorm's running statistics passed in and written back), then runs
through the same passes as any graph; checkpoint placement works inside the
one graph (``passes/checkpoint.py::rematerialize``), and new parameters and
optimizer state are written over the old ones inside the program (buffer
donation, ``passes/buffer_reuse.py``). Memory planning therefore spans the
whole step: a gradient's storage is reused as soon as its update has
consumed it. Without an optimizer the gradients are accumulated into
``.grad`` as autograd does.

Supported optimizers: SGD, Adam and AdamW with any number of parameter
groups, flag by flag (``compiler/optimizers.py``). Their state lives in
``optimizer.state`` in torch's own format, so the optimizer can be stepped
eagerly or saved as usual. The per-group numbers a scheduler changes are
tensor inputs of the program, so a schedule never recompiles. Parameters the
loss does not reach get no update and no state, as in eager (whose
``zero_grad`` leaves their ``.grad`` None); which those are is found by a
fake-tensor trace of the loss with ``torch.autograd.grad`` before the step is
traced, so ``loss_fn`` runs twice per new signature. A ``DistributedDataParallel``
model is unwrapped and its gradients averaged inside the program
(``compiler/distributed.py``, docs/distributed.md). ``max_grad_norm`` clips the
gradients by their global L2 norm inside the program, before the update. At
most ``max_programs`` step programs are kept, least recently used released
(recompiles.py); threads making a signature's first call together compile once.

This module holds the step's calls and its programs per signature; the
traced function is step_function.py's, the optimizer state's round trip
step_state.py's, and the symbolic step (a varying batch size) step_dynamic.py's.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch.fx.experimental.proxy_tensor import make_fx
from torch.func import functionalize

from retrograd import capture
from retrograd.capture import signature
from retrograd.decompositions import traced_right
from retrograd.distributed import check_same_parameters, unwrap
from retrograd.locking import compiling
from retrograd.optimizers import (SUPPORTED_OPTIMIZERS, Hyperparameters, check_optimizer,
                                  family, mark_stepped, structure)
from retrograd.options import Options
from retrograd.graph_compiler import GraphCompiler
from retrograd.provenance import recording
from retrograd.recompiles import ProgramBound
from retrograd.step_dynamic import DynamicSteps
from retrograd.step_function import loss_function, reached_parameters, step_function
from retrograd.step_state import OptimizerState, hyper_dtype

__all__ = ["compile_step", "Step", "SUPPORTED_OPTIMIZERS"]


def _check_max_grad_norm(value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"retrograd.compile_step: max_grad_norm={value!r} must be None or a "
                         f"positive finite number")


class Step:
    """A compiled training step; call it with a batch, get the loss."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, optimizer, options: Options,
                 max_grad_norm: float | None = None, distributed: dict | None = None):
        # DDP or process_group=: the step averages gradients itself (distributed.py)
        model, self.replicas = unwrap(model, optimizer=optimizer, **(distributed or {}))
        check_optimizer(optimizer)
        _check_max_grad_norm(max_grad_norm)
        if max_grad_norm is not None and optimizer is None:
            raise ValueError("retrograd.compile_step: max_grad_norm needs an optimizer (without "
                             "one the gradients accumulate in .grad, clip them there)")
        self.model, self.loss_fn, self.optimizer, self.options = model, loss_fn, optimizer, options
        self.max_grad_norm = max_grad_norm
        self.kind = family(optimizer)
        self.hyperparameters = Hyperparameters()
        #: per signature without the state: which parameters the loss reaches
        self.reached: OrderedDict[tuple, tuple[int, ...]] = OrderedDict()
        #: per signature, least recently used first; at most options.max_programs
        self.entries: OrderedDict[tuple, tuple[Any, GraphCompiler]] = OrderedDict()
        self.lock = threading.Lock()   # reached and entries, for threads sharing the step
        self.bound = ProgramBound("retrograd.compile_step")
        self.last: tuple | None = None
        self.optimizer_state = OptimizerState(optimizer, self.kind)   # step_state.py
        if self.replicas is not None:
            check_same_parameters(model, self.replicas)
        # a batch size that varies: one symbolic program after the second (step_dynamic.py)
        self.dynamic = DynamicSteps(options, f"the training step of {type(model).__name__}")

    @property
    def reports(self) -> dict[str, dict]:
        """The report of the last signature's program (``{"step": report}``)."""
        with self.lock:
            entry = self.entries.get(self.last) if self.last else None
        return entry[1].reports if entry is not None else self.dynamic.reports

    # -- one call -------------------------------------------------------------------
    def __call__(self, *batch):
        check_optimizer(self.optimizer)   # flags may have changed since the last call
        if self.replicas is not None:   # no_sync refused, buffers from rank 0
            self.replicas.before_step()
        every = list(self.model.named_parameters())   # one walk of the model per step
        named = [(n, p) for n, p in every if p.requires_grad]
        names, parameters = [n for n, _ in named], [p for _, p in named]
        # frozen parameters ride along with the buffers: inputs, never differentiated
        other = [(n, p.detach()) for n, p in every if not p.requires_grad]
        other += self.model.named_buffers()
        buffer_names, buffers = [n for n, _ in other], [b for _, b in other]
        leaves, batch_spec = pytree.tree_flatten(batch)
        device, groups = _device(parameters, leaves), self.optimizer_state.groups(parameters)
        detached = [p.detach() for p in parameters]
        shape = signature(parameters + buffers + leaves) + (
            structure(self.optimizer), groups, self.max_grad_norm, self.model.training,
            str(batch_spec))
        loss_of = loss_function(self.model, self.loss_fn, names, buffer_names, batch_spec)
        used = self._used(shape, loss_of, detached, buffers, leaves, names)
        owned = self.replicas.owned(used, parameters) if self.replicas else used   # ZeRO-1
        state, clocks, clock_of, fresh = self.optimizer_state.inputs(parameters, owned, groups,
                                                                     device)
        hyper = [] if self.optimizer is None else self.hyperparameters.inputs(
            self.optimizer, clocks, device, hyper_dtype(parameters))
        seed = torch.ones((), dtype=torch.float32, device=device)
        inputs = [detached, buffers, state, hyper, fresh, leaves, seed]
        key = shape + (clock_of,) + signature(state + hyper + fresh)
        executable = self._use(key)   # a size with its own program keeps it
        if executable is None:
            executable = self.dynamic.program(
                key, len(parameters) + len(buffers), leaves, inputs,
                lambda: step_function(self, loss_of, used, groups, clock_of),
                self._updates(inputs, used, len(inputs[2])))
            self.last = None if executable is not None else self.last
        if executable is None:
            executable = self._program(key, inputs, loss_of, used, groups, clock_of)
        with torch.no_grad():   # the program computes its own gradients
            flat = [v.detach() if isinstance(v, torch.Tensor) else v
                    for v in pytree.tree_flatten(inputs)[0]]
            outputs = executable(flat)
        loss = outputs[0]
        new_params, new_state = outputs[1:1 + len(used)], outputs[1 + len(used):]
        groups_used = [self.optimizer.param_groups[groups[i]] for i in used] if groups else []
        self.optimizer_state.write_back([parameters[i] for i in used], groups_used, new_params,
                                        state, new_state, [parameters[i] for i in owned])
        mark_stepped(self.optimizer)
        return loss

    # -- programs per signature, bounded --------------------------------------------
    def _used(self, shape: tuple, loss_of, detached, buffers, leaves,
              names) -> tuple[int, ...]:
        """The parameters the loss reaches for ``shape``, probed once (at most
        ``max_programs`` signatures remembered, as programs are); under DDP,
        those it reaches on any rank."""
        with self.lock:
            used = self.reached.get(shape)
            if used is not None:
                self.reached.move_to_end(shape)
        if used is None:
            with compiling():   # threads starting together probe once
                used = self.reached.get(shape)
                if used is None:
                    used = reached_parameters(loss_of, detached, buffers, leaves)
                    if self.replicas is not None:
                        used = self.replicas.agree(used, names)
            with self.lock:
                self.reached[shape] = used
                while len(self.reached) > self.options.max_programs:
                    self.reached.popitem(last=False)
        return used

    def _use(self, key: tuple):
        """The executable of ``key`` if kept (now the most recently used), else None."""
        with self.lock:
            entry = self.entries.get(key)
            if entry is None:
                return None
            self.entries.move_to_end(key)
            self.last = key
            return entry[0]

    def _program(self, key: tuple, inputs, loss_of, used, groups, clock_of):
        """The executable of ``key``, compiled on first use. ``key`` is looked up
        again under the compile lock, so threads making the first call of a
        signature together wait for one compile and all use it."""
        executable = self._use(key)
        if executable is not None:
            return executable
        with compiling():
            executable = self._use(key)
            if executable is not None:
                return executable
            entry = self._compile(inputs, loss_of, used, groups, clock_of)
            with self.lock:
                self.entries[key] = entry
                self.last = key
                self._bound(key)
        return entry[0]

    def _bound(self, key: tuple) -> None:
        """Release the least recently used programs past ``max_programs`` (the
        new ``key`` is the most recent; recompiles.ProgramBound). Called
        holding ``self.lock``; a thread running a released program holds it
        until its call ends."""
        what = f"the training step of {type(self.model).__name__}"
        self.bound.enforce(key, self.entries, self.options.max_programs,
                           lambda: len(self.entries),
                           lambda: self.entries.popitem(last=False), what)

    def _compile(self, inputs, loss_of, used, groups, clock_of):
        function = step_function(self, loss_of, used, groups, clock_of)
        with compiling():   # trace and pipeline, one thread at a time (locking.py)
            flat = pytree.tree_flatten(inputs)[0]
            with traced_right():
                traced = make_fx(functionalize(recording(function)),   # source lines
                                 decomposition_table=capture.decompositions_for(
                                     self.options.executor, flat),
                                 tracing_mode="fake", _allow_non_fake_inputs=True)(*inputs)
            compiler = GraphCompiler(self.options, flat)
            updates = self._updates(inputs, used, len(inputs[2]))
            executable = compiler.compile_step(traced, flat, seed=len(flat) - 1,
                                               updates=updates)
        return executable, compiler

    def _updates(self, inputs, used, state_count: int) -> dict[int, int]:
        """Output position -> input position of each value the step replaces
        (parameters, optimizer state), for the program to update in place."""
        if self.optimizer is None:
            return {}
        state_at = sum(len(part) for part in inputs[:2])
        pairs = {1 + k: index for k, index in enumerate(used)}
        pairs.update({1 + len(used) + j: state_at + j for j in range(state_count)})
        return pairs

def _device(parameters, leaves) -> torch.device:
    for value in list(parameters) + list(leaves):
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def compile_step(model: torch.nn.Module, loss_fn: Callable, optimizer=None, *,
                 max_grad_norm: float | None = None, process_group=None,
                 bucket_cap_mb: float | None = None, shard_optimizer_state: bool = False,
                 **options) -> Step:
    """Compile ``loss_fn(model, *batch)``'s training step, optimizer update included.

    ``max_grad_norm`` clips the gradients as ``torch.nn.utils.clip_grad_norm_``
    (global L2 norm) between the backward and the update; ``process_group``
    averages the gradients across its ranks as DDP would (all-reduces of
    ``bucket_cap_mb`` MiB buckets, overlapped with the backward;
    docs/distributed.md); ``shard_optimizer_state`` (ZeRO-1) keeps each
    parameter's optimizer state on one rank; ``options`` are the compiler options of
    ``retrograd.compile``.

    Example:
        >>> step = retrograd.compile_step(model, lambda m, x, y: F.cross_entropy(m(x), y),
        ...                               torch.optim.AdamW(model.parameters(), lr=1e-3))
        >>> loss = step(x, y)
    """
    return Step(model, loss_fn, optimizer, Options.from_mapping(options), max_grad_norm,
                {"process_group": process_group, "bucket_cap_mb": bucket_cap_mb,
                 "shard_optimizer_state": shard_optimizer_state})
