"""The optimizer's state in torch's own format, in and out of the step program.

``compile_step`` keeps the optimizer's state where torch keeps it
(``optimizer.state[p]``), so the optimizer can be stepped eagerly or saved as
usual. ``OptimizerState.inputs`` reads it (created as torch creates it on a
first step) into the program's state inputs, Adam's clocks and SGD's
fresh-buffer flags; ``write_back`` puts the program's new parameters, state
and step counts back, copying only what the program did not already write
in place.
"""

from __future__ import annotations

import torch

from retrograd.optimizers import initial_state, state_keys

__all__ = ["OptimizerState", "group_indices", "hyper_dtype"]


def group_indices(optimizer, parameters) -> tuple[int, ...]:
    """The index of each parameter's group in ``optimizer.param_groups``."""
    where = {id(p): index for index, group in enumerate(optimizer.param_groups)
             for p in group["params"]}
    if any(id(p) not in where for p in parameters):
        raise ValueError("retrograd.compile_step: a trainable parameter of the model is not in "
                         "the optimizer")
    return tuple(where[id(p)] for p in parameters)


def hyper_dtype(parameters) -> torch.dtype:
    """float64 numbers for float64 parameters, float32 otherwise (as torch's
    scalar arguments are rounded to the computation's type)."""
    return torch.float64 if any(p.dtype == torch.float64 for p in parameters) else torch.float32


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``b`` is ``a``'s memory, shape and strides (the program wrote it in place)."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.device == b.device)


class OptimizerState:
    """``optimizer``'s state (of family ``kind``: None, "SGD" or "Adam") as
    the step program's inputs and outputs."""

    def __init__(self, optimizer, kind: str | None):
        self.optimizer, self.kind = optimizer, kind
        self._fresh: tuple[tuple, torch.Tensor] | None = None

    def groups(self, parameters) -> tuple[int, ...]:
        return group_indices(self.optimizer, parameters) if self.optimizer is not None else ()

    def inputs(self, parameters, used, groups, device) -> tuple[list, list, tuple, list]:
        """(state tensors, Adam clocks, each reached parameter's clock, [SGD
        fresh-buffer flags]) of the parameters the loss reaches, state created
        as torch creates it. A clock is (group index, step count after this
        step); parameters that share one share their bias corrections."""
        if self.optimizer is None:
            return [], [], (), []
        flat, fresh, clocks, clock_of = [], [], {}, []
        for index in used:
            p, group = parameters[index], self.optimizer.param_groups[groups[index]]
            state = self.optimizer.state[p]
            if self.kind == "Adam":
                if not state:
                    state.update(initial_state(self.kind, group, p))
                flat += [state[key] for key in state_keys(self.kind, group)]
                clock = (groups[index], float(state["step"]) + 1)
                clock_of.append(clocks.setdefault(clock, len(clocks)))
            elif state_keys(self.kind, group):
                buffer = state.get("momentum_buffer")
                fresh.append(buffer is None)
                flat.append(torch.zeros_like(p) if buffer is None else buffer)
        return flat, list(clocks), tuple(clock_of), self._fresh_flags(tuple(fresh), device)

    def _fresh_flags(self, values: tuple, device) -> list:
        """One bool tensor, kept while the flags stay the same (after the first step)."""
        if not values:
            return []
        if self._fresh is None or self._fresh[0] != values or self._fresh[1].device != device:
            self._fresh = (values, torch.tensor(values, dtype=torch.bool, device=device))
        return [self._fresh[1]]

    def write_back(self, parameters, groups, new_params, state, new_state, owned) -> None:
        """Parameters, state and step counts of the reached parameters (state
        of the ``owned`` ones: all, or this rank's under ZeRO-1), in place
        where the program did not already write them."""
        with torch.no_grad():
            if self.optimizer is None:   # gradients accumulate as autograd does
                for p, g in zip(parameters, new_params):
                    p.grad = g if p.grad is None else p.grad.add_(g)
                return
            for target, value in zip(list(parameters) + list(state),
                                     list(new_params) + list(new_state)):
                if not _same_memory(target, value):   # not already updated in place
                    target.copy_(value)
            cursor = 0
            group_of = {id(p): group for p, group in zip(parameters, groups)}
            for p in owned:
                group = group_of[id(p)]
                entry = self.optimizer.state[p]
                for key in state_keys(self.kind, group):
                    entry[key] = state[cursor]   # SGD's first buffer is created here
                    cursor += 1
                if self.kind == "Adam":
                    entry["step"] += 1
