"""The optimizer updates ``compile_step`` writes into its program.

Each supported class (SGD, Adam, AdamW) is read flag by flag from its
parameter groups, never by class name alone: a flag retrograd implements
changes the traced update (``maximize``, ``nesterov``,
``decoupled_weight_decay``, ``amsgrad``), a flag that only picks eager's
implementation (``foreach``, ``fused``) is irrelevant to a program that is
its own fused implementation, and any other value -- ``capturable``,
``differentiable``, a tensor learning rate, a flag this version does not
know -- is a ``ValueError`` naming it.

The per-group numbers a learning-rate scheduler may change (lr, momentum,
dampening, betas, eps, weight decay) are *inputs* of the program: 0-dim
tensors, computed on the host in double precision (``1 - beta`` rather than
``beta`` where a difference from 1 is what the update needs, as torch
computes it in Python floats) and refreshed in place when a value changes.
A schedule therefore never recompiles; only structural choices (momentum or
weight decay zero or not, nesterov, maximize, amsgrad, decoupled decay) are
part of the compiled signature. Adam's step counts stay on the host, as in
torch with ``capturable=False``: its bias corrections are computed there in
double per *clock* (a group at one step count; every parameter of a group
shares one unless some got gradients at other steps) and enter as inputs too,
so the program reads no host tensor.

The update formulas follow torch's single-tensor implementations
(``torch/optim/sgd.py``, ``torch/optim/adam.py``) operation by operation.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["SUPPORTED_OPTIMIZERS", "check_optimizer", "family", "structure", "state_keys",
           "initial_state", "Hyperparameters", "update", "clip_gradients", "mark_stepped"]

SUPPORTED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)

#: Flags whose value changes the update retrograd traces (any value accepted).
_IMPLEMENTED = {
    "SGD": ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"),
    "Adam": ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize",
             "decoupled_weight_decay"),
}
#: Flags that only choose eager's implementation of the same arithmetic.
_IMPLEMENTATION_CHOICES = ("foreach", "fused")
#: Flags accepted only with their default value (why, for the error message).
_REFUSED = {
    "capturable": "the step count stays on the host, as with capturable=False",
    "differentiable": "the compiled step is not itself differentiated",
}
#: Group values that must be plain numbers (a scheduler writes floats).
_NUMBERS = ("lr", "momentum", "dampening", "weight_decay", "eps")


def family(optimizer) -> str | None:
    """The update family: ``"SGD"``, ``"Adam"`` (AdamW is Adam with its own
    default flags) or None without an optimizer."""
    if optimizer is None:
        return None
    return "SGD" if type(optimizer) is torch.optim.SGD else "Adam"


def _fail(optimizer, message: str) -> ValueError:
    return ValueError(f"retrograd.compile_step: {type(optimizer).__name__} {message}")


def check_optimizer(optimizer) -> None:
    """Raise ``ValueError`` naming the first class, flag or value not implemented."""
    if optimizer is None:
        return
    if type(optimizer) not in SUPPORTED_OPTIMIZERS:
        names = ", ".join(o.__name__ for o in SUPPORTED_OPTIMIZERS)
        raise ValueError(f"retrograd.compile_step: optimizer {type(optimizer).__name__} is not "
                         f"supported; supported: {names} (or None to fill .grad)")
    _check_hooks(optimizer)
    known = set(_IMPLEMENTED[family(optimizer)]) | set(_IMPLEMENTATION_CHOICES) | set(_REFUSED)
    unknown = sorted(set(optimizer.defaults) - known)
    if unknown:
        raise _fail(optimizer, f"flag {unknown[0]!r} is not known to retrograd (this "
                               f"torch is newer than its optimizer support)")
    for group in optimizer.param_groups:
        for flag, why in _REFUSED.items():
            if group.get(flag):
                raise _fail(optimizer, f"with {flag}=True is not supported ({why})")
        numbers = [(name, group[name]) for name in _NUMBERS if name in group]
        numbers += [("betas", beta) for beta in group.get("betas", ())]
        for name, value in numbers:
            if isinstance(value, torch.Tensor):
                raise _fail(optimizer, f"with a tensor {name} is not supported (use a "
                                       f"Python float)")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _fail(optimizer, f"with {name}={value!r} is not supported")


def _check_hooks(optimizer) -> None:
    """Step hooks would never run: the program replaces ``optimizer.step``."""
    from torch.optim import optimizer as module
    hooks = (getattr(optimizer, "_optimizer_step_pre_hooks", None),
             getattr(optimizer, "_optimizer_step_post_hooks", None),
             getattr(module, "_global_optimizer_pre_hooks", None),
             getattr(module, "_global_optimizer_post_hooks", None))
    if any(hooks):
        raise _fail(optimizer, "has step hooks (register_step_pre_hook/post_hook or the "
                               "global ones); compile_step does not call optimizer.step(), "
                               "so they would not run")


def mark_stepped(optimizer) -> None:
    """What a learning-rate scheduler's wrapper around ``optimizer.step`` records
    (``_opt_called``), so the scheduler does not warn that step was skipped."""
    if optimizer is not None:
        optimizer._opt_called = True


def structure(optimizer) -> tuple:
    """What the traced update depends on besides tensor shapes: per group, the
    flags and the zero-or-not choices eager branches on."""
    kind = family(optimizer)
    if kind is None:
        return ()
    shapes = []
    for group in optimizer.param_groups:
        if kind == "SGD":
            shapes.append((group["momentum"] != 0, group["weight_decay"] != 0,
                           bool(group["nesterov"]), bool(group["maximize"])))
        else:
            shapes.append((group["weight_decay"] != 0, bool(group["decoupled_weight_decay"]),
                           bool(group["amsgrad"]), bool(group["maximize"])))
    return (type(optimizer).__name__, tuple(shapes))


def state_keys(kind: str, group: dict) -> tuple[str, ...]:
    """The ``optimizer.state[p]`` tensors (torch's names) the program reads and replaces."""
    if kind == "SGD":
        return ("momentum_buffer",) if group["momentum"] != 0 else ()
    return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())


def initial_state(kind: str, group: dict, parameter: torch.Tensor) -> dict:
    """Adam's state as torch creates it on a parameter's first gradient (SGD's
    momentum buffer is created by the step itself, see ``update``)."""
    if kind == "SGD":
        return {}
    zeros = [torch.zeros_like(parameter, memory_format=torch.preserve_format)
             for _ in state_keys(kind, group)]
    return {"step": torch.tensor(0.0, dtype=torch.get_default_dtype()),
            **dict(zip(state_keys(kind, group), zeros))}


def _values(kind: str, group: dict) -> dict[str, float]:
    """A group's numbers as the update reads them, computed in double."""
    lr, decay = float(group["lr"]), float(group["weight_decay"])
    if kind == "SGD":
        return {"lr": lr, "weight_decay": decay, "momentum": float(group["momentum"]),
                "one_minus_dampening": 1.0 - float(group["dampening"])}
    beta1, beta2 = (float(b) for b in group["betas"])
    return {"weight_decay": decay, "one_minus_beta1": 1.0 - beta1, "beta2": beta2,
            "one_minus_beta2": 1.0 - beta2, "eps": float(group["eps"]),
            "decay_factor": 1.0 - lr * decay}


def _clock_values(group: dict, step: float) -> dict[str, float]:
    """Adam's bias corrections at step ``step`` (the count after this update),
    computed on the host in double as torch does with its host step count."""
    beta1, beta2 = (float(b) for b in group["betas"])
    return {"step_size": float(group["lr"]) / (1.0 - beta1 ** step),
            "correction2_sqrt": (1.0 - beta2 ** step) ** 0.5}


class Hyperparameters:
    """The 0-dim tensor inputs holding every group's numbers (and, for Adam,
    every *clock*'s: a group at one step count), kept between calls on the
    parameters' device and refreshed in place (``fill_``: no host-device
    synchronization) only where a value changed."""

    def __init__(self):
        self.tensors: dict[tuple, torch.Tensor] = {}
        self.seen: dict[tuple, float] = {}

    def inputs(self, optimizer, clocks: Sequence[tuple[int, float]], device: torch.device,
               dtype: torch.dtype) -> list[torch.Tensor]:
        """Per group its numbers, then per clock ``(group index, step)`` its
        corrections, each group or clock in name order."""
        kind, groups = family(optimizer), optimizer.param_groups
        values = [((index, name), value) for index, group in enumerate(groups)
                  for name, value in _values(kind, group).items()]
        values += [(("clock", k, name), value) for k, (index, step) in enumerate(clocks)
                   for name, value in _clock_values(groups[index], step).items()]
        return [self._tensor(key, value, device, dtype) for key, value in values]

    def _tensor(self, key: tuple, value: float, device, dtype) -> torch.Tensor:
        tensor = self.tensors.get(key)
        if tensor is None or tensor.device != device or tensor.dtype != dtype:
            tensor = self.tensors[key] = torch.full((), value, dtype=dtype, device=device)
        elif self.seen[key] != value:
            tensor.fill_(value)
        self.seen[key] = value
        return tensor

    @staticmethod
    def unflatten(optimizer, clock_count: int, flat: Sequence) -> tuple[list, list]:
        """(per group, per clock) name -> traced input: the inverse of ``inputs``."""
        kind, groups, cursor = family(optimizer), [], 0
        for group in optimizer.param_groups:
            names = list(_values(kind, group))
            groups.append(dict(zip(names, flat[cursor:cursor + len(names)])))
            cursor += len(names)
        names = ("step_size", "correction2_sqrt")
        clocks = [dict(zip(names, flat[cursor + 2 * k:cursor + 2 * k + 2]))
                  for k in range(clock_count)]
        return groups, clocks


def momentum_weights(hyper: dict, fresh):
    """SGD's weights of the old momentum buffer and of the gradient, one pair per
    parameter flagged in ``fresh`` (true where the buffer does not exist yet):
    torch starts a fresh buffer at the gradient itself, the same as blending a
    zero buffer with weights (0, 1). Chosen on these numbers, not by a ``where``
    over whole tensors, so each gradient is read once and dies at its update
    (a ``where`` also kept the unscaled gradient); computed once per group."""
    return (torch.where(fresh, 0.0, hyper["momentum"]),
            torch.where(fresh, 1.0, hyper["one_minus_dampening"]))


def update(kind: str, group: dict, hyper: dict, clock: dict | None, p, g, state: list, blend):
    """One parameter's new value and new state tensors, as torch computes them.

    ``hyper`` holds the group's numbers as traced tensors, ``clock`` Adam's
    bias corrections at this parameter's step; ``group`` is read only for
    structural flags. ``blend`` is this parameter's pair of SGD momentum
    weights (``momentum_weights``).
    """
    if group["maximize"]:
        g = -g
    decay = group["weight_decay"] != 0
    if kind == "SGD":
        if decay:
            g = g + hyper["weight_decay"] * p
        if group["momentum"] == 0:
            return p - hyper["lr"] * g, []
        keep, take = blend
        buffer = keep * state[0] + take * g
        direction = g + hyper["momentum"] * buffer if group["nesterov"] else buffer
        return p - hyper["lr"] * direction, [buffer]
    if decay and group["decoupled_weight_decay"]:
        p = p * hyper["decay_factor"]
    elif decay:
        g = g + hyper["weight_decay"] * p
    exp_avg = state[0] + (g - state[0]) * hyper["one_minus_beta1"]
    exp_avg_sq = state[1] * hyper["beta2"] + hyper["one_minus_beta2"] * g * g
    new_state = [exp_avg, exp_avg_sq]
    second = exp_avg_sq
    if group["amsgrad"]:
        second = torch.maximum(state[2], exp_avg_sq)
        new_state.append(second)
    denominator = second.sqrt() / clock["correction2_sqrt"] + hyper["eps"]
    return p - clock["step_size"] * (exp_avg / denominator), new_state


def clip_gradients(grads: list, max_norm: float) -> list:
    """``torch.nn.utils.clip_grad_norm_(..., max_norm)``: every gradient scaled
    by ``min(1, max_norm / (||all gradients||_2 + 1e-6))``."""
    if not grads:
        return grads
    total = _wide(grads[0]).square().sum()
    for g in grads[1:]:
        total = total + _wide(g).square().sum()
    total = total.sqrt()
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return [g * scale.to(g.dtype) for g in grads]


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """Half precision summed in float32 (as torch's norms accumulate); wider kept."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor
