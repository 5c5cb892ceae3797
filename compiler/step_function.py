"""The function ``compile_step`` traces: the loss, its gradients, the update.

``loss_function`` is the user's ``loss_fn(model, *batch)`` as a function of
parameters, buffers and batch leaves (the model reparametrized, ties kept);
``reached_parameters`` finds which parameters autograd would give a
gradient, by a fake-tensor trace; ``step_function`` is the whole step that
step.py traces with ``make_fx``: ``grad_and_value`` of the loss times a seed,
the DDP average and clipping when asked, then the optimizer's update
(optimizers.py) per reached parameter. Each runs only while tracing.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.utils._pytree as pytree
from torch.fx.experimental.proxy_tensor import make_fx
from torch.func import grad_and_value

from retrograd.decompositions import traced_right
from retrograd.optimizers import (Hyperparameters, clip_gradients, momentum_weights,
                                  state_keys, update)

__all__ = ["loss_function", "reached_parameters", "step_function", "tied_names"]


def tied_names(model: torch.nn.Module) -> dict[str, str]:
    """Every further name of a shared parameter or buffer (a language model's
    output layer tied to its embedding) -> the name ``named_parameters`` gives
    it, so the traced step replaces the tensor under all its names."""
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False),
                         *model.named_buffers(remove_duplicate=False)]:
        if id(tensor) in first:
            tied[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return tied


def loss_function(model: torch.nn.Module, loss_fn: Callable, names, buffer_names,
                  batch_spec) -> Callable:
    """The loss as a function of parameters, buffers and batch leaves; it
    runs only while tracing, so the model's ties are looked up there and
    not on every step."""
    def loss_of(params, buffers, batch):
        state = dict(zip(names, params))
        state.update(zip(buffer_names, buffers))
        state.update({alias: state[name] for alias, name in tied_names(model).items()
                      if name in state})
        with torch.nn.utils.stateless._reparametrize_module(model, state):
            loss = loss_fn(model, *pytree.tree_unflatten(batch, batch_spec))
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("retrograd.compile_step: loss_fn must return a scalar tensor, "
                             f"got {getattr(loss, 'shape', type(loss).__name__)}")
        if not loss.is_floating_point():
            raise ValueError("retrograd.compile_step: loss_fn must return a floating-point "
                             f"loss, got dtype {loss.dtype} (it has no gradient)")
        return loss.reshape(())
    return loss_of


def reached_parameters(loss_of, parameters, buffers, leaves) -> tuple[int, ...]:
    """Indices of the parameters autograd gives a gradient (eager's
    ``.grad`` is not None), found by a fake-tensor trace of the loss and
    ``torch.autograd.grad``: ``grad_and_value`` returns zeros for the others."""
    found: list[bool] = []

    def probe(params, buffers, batch):
        params = [p.detach().requires_grad_() for p in params]
        with torch.enable_grad():
            loss = loss_of(params, buffers, batch)
            grads = (torch.autograd.grad(loss, params, allow_unused=True)
                     if loss.requires_grad else [None] * len(params))
        found.extend(g is not None for g in grads)
        return loss.detach()
    with traced_right():   # a tensor the loss closes over (class weights) is a constant
        make_fx(probe, tracing_mode="fake", _allow_non_fake_inputs=True)(
            [p.detach() for p in parameters], buffers, leaves)
    return tuple(index for index, reached in enumerate(found) if reached)


def step_function(step, loss_of, used, groups, clock_of) -> Callable:
    """The traced step of ``step`` (a ``step.Step``: its optimizer family,
    optimizer, ``max_grad_norm`` and DDP replicas) for the reached parameters
    ``used``: ``(params, buffers, state, hyper, fresh, batch, seed) ->
    (loss, new parameters, new state)``."""
    kind, optimizer, max_norm = step.kind, step.optimizer, step.max_grad_norm
    replicas = step.replicas
    clock_count = len(set(clock_of))

    def seeded(params, buffers, batch, seed):
        """The loss times its cotangent ``seed`` (1 at run time): every
        backward node then depends on the seed, which is how the checkpoint
        pass tells backward from forward inside the one graph."""
        loss = loss_of(params, buffers, batch)
        return loss * seed, loss

    def traced(params, buffers, state, hyper, fresh, batch, seed):
        # FSDP2 (fsdp.py): the local shards all-gathered into full parameters first
        full = replicas.unshard(params) if replicas is not None else params
        grads, (_, loss) = grad_and_value(seeded, has_aux=True)(full, buffers, batch, seed)
        grads = [grads[index] for index in used]
        if replicas is not None:   # DDP's average (ZeRO-1: own shard), in the program
            grads = replicas.average(grads, used, params)
        if max_norm is not None:
            grads = (replicas.clip(grads, max_norm, used, params) if replicas is not None
                     else clip_gradients(grads, max_norm))
        if kind is None:
            return loss, grads, []
        per_group, per_clock = Hyperparameters.unflatten(optimizer, clock_count, hyper)
        weights = {}   # SGD momentum weights per group, over all buffers: once each
        # ZeRO-1 (zero.py): this rank updates its own parameters, then shares them
        owned = replicas.owned(used, params) if replicas is not None else used
        position = {index: k for k, index in enumerate(used)}
        new_params, new_state, cursor, momentum = {}, [], 0, 0
        for k, index in enumerate(owned):
            group = optimizer.param_groups[groups[index]]
            width = len(state_keys(kind, group))
            blend = clock = None
            if kind == "SGD" and width:
                if groups[index] not in weights:
                    weights[groups[index]] = momentum_weights(per_group[groups[index]],
                                                              fresh[0])
                keep, take = weights[groups[index]]
                blend, momentum = (keep[momentum], take[momentum]), momentum + 1
            if kind == "Adam":
                clock = per_clock[clock_of[k]]
            value, kept = update(kind, group, per_group[groups[index]], clock, params[index],
                                 grads[position[index]], state[cursor:cursor + width],
                                 blend)
            cursor += width
            new_params[index] = value
            new_state += kept
        values = [new_params.get(index, params[index]) for index in used]
        return loss, replicas.share(values, used, params) if replicas else values, new_state
    return traced
