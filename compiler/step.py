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

Supported optimizers: SGD (momentum, dampening, nesterov, weight decay),
Adam and AdamW (weight decay; no amsgrad), with any number of parameter
groups. Their state lives in ``optimizer.state`` in torch's own format, so
the optimizer can be stepped eagerly or saved as usual. Hyperparameters are
baked into the trace; changing one (a learning-rate schedule) traces again.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch.fx.experimental.proxy_tensor import make_fx
from torch.func import functionalize, grad_and_value

from retrograd.capture import signature
from retrograd.decompositions import decomposition_table
from retrograd.options import Options
from retrograd.pipeline import GraphCompiler

__all__ = ["compile_step", "Step", "SUPPORTED_OPTIMIZERS"]

SUPPORTED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def _hyper(optimizer, parameter) -> dict:
    for group in optimizer.param_groups:
        if any(p is parameter for p in group["params"]):
            return group
    raise ValueError("retrograd.compile_step: a trainable parameter of the model is not in "
                     "the optimizer")


def _check_optimizer(optimizer) -> None:
    if optimizer is None:
        return
    if type(optimizer) not in SUPPORTED_OPTIMIZERS:
        names = ", ".join(o.__name__ for o in SUPPORTED_OPTIMIZERS)
        raise ValueError(f"retrograd.compile_step: optimizer {type(optimizer).__name__} is not "
                         f"supported; supported: {names} (or None to fill .grad)")
    for group in optimizer.param_groups:
        for flag in ("amsgrad", "maximize", "capturable", "differentiable"):
            if group.get(flag):
                raise ValueError(f"retrograd.compile_step: {type(optimizer).__name__} with "
                                 f"{flag}=True is not supported")
        if isinstance(group["lr"], torch.Tensor):
            raise ValueError("retrograd.compile_step: a tensor learning rate is not supported")


def _update(kind: str, group: dict, p, g, state: list, step, first: bool):
    """One parameter's new value and new state, written as torch computes them."""
    lr, decay = group["lr"], group.get("weight_decay", 0.0)
    if kind == "SGD":
        momentum, dampening = group["momentum"], group["dampening"]
        if decay:
            g = g + decay * p
        if not momentum:
            return p - lr * g, []
        buffer = g if first else momentum * state[0] + (1 - dampening) * g
        direction = g + momentum * buffer if group["nesterov"] else buffer
        return p - lr * direction, [buffer]
    beta1, beta2 = group["betas"]
    exp_avg, exp_avg_sq = state
    if kind == "AdamW":
        p = p * (1 - lr * decay)
    elif decay:
        g = g + decay * p
    exp_avg = exp_avg + (g - exp_avg) * (1 - beta1)
    exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * g * g
    correction1 = 1 - torch.pow(beta1, step)
    correction2 = 1 - torch.pow(beta2, step)
    denominator = (exp_avg_sq.sqrt() / correction2.sqrt()) + group["eps"]
    return p - (lr / correction1) * exp_avg / denominator, [exp_avg, exp_avg_sq]


class Step:
    """A compiled training step; call it with a batch, get the loss."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, optimizer, options: Options):
        _check_optimizer(optimizer)
        self.model, self.loss_fn, self.optimizer, self.options = model, loss_fn, optimizer, options
        self.entries: dict[tuple, tuple[Any, GraphCompiler]] = {}
        self.last: tuple | None = None

    @property
    def reports(self) -> dict[str, dict]:
        """The report of the last signature's program (``{"step": report}``)."""
        return self.entries[self.last][1].reports if self.last else {}

    # -- state in torch's own format ----------------------------------------------
    def _state(self, parameters) -> tuple[list, torch.Tensor | None, bool]:
        """(flat state tensors, step count tensor, first step?)"""
        if self.optimizer is None:
            return [], None, False
        kind = type(self.optimizer).__name__
        flat, first, step = [], False, None
        for p in parameters:
            state = self.optimizer.state[p]
            if kind == "SGD":
                if _hyper(self.optimizer, p)["momentum"]:
                    first = first or state.get("momentum_buffer") is None
                    flat.append(state.get("momentum_buffer"))
            else:
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                flat += [state["exp_avg"], state["exp_avg_sq"]]
                step = state["step"]
        if first:
            flat = [torch.zeros_like(p) for p in parameters if self.optimizer.state[p] is not None
                    and _hyper(self.optimizer, p)["momentum"]]
        return flat, step, first

    def _function(self, names, buffer_names, parameters, first, batch_spec):
        model, loss_fn, optimizer = self.model, self.loss_fn, self.optimizer
        kind = type(optimizer).__name__ if optimizer is not None else None
        groups = [_hyper(optimizer, p) for p in parameters] if optimizer is not None else []
        per_parameter = 0 if kind is None else 1 if kind == "SGD" else 2

        tied = _tied_names(model)

        def loss_of(params, buffers, batch):
            state = dict(zip(names, params))
            state.update(zip(buffer_names, buffers))
            state.update({alias: state[name] for alias, name in tied.items() if name in state})
            with torch.nn.utils.stateless._reparametrize_module(model, state):
                loss = loss_fn(model, *pytree.tree_unflatten(batch, batch_spec))
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError("retrograd.compile_step: loss_fn must return a scalar tensor, "
                                 f"got {getattr(loss, 'shape', type(loss).__name__)}")
            return loss.reshape(())

        def seeded(params, buffers, batch, seed):
            """The loss times its cotangent ``seed`` (1 at run time): every
            backward node then depends on the seed, which is how the checkpoint
            pass tells backward from forward inside the one graph."""
            loss = loss_of(params, buffers, batch)
            return loss * seed, loss

        def step(params, buffers, state, count, batch, seed):
            grads, (_, loss) = grad_and_value(seeded, has_aux=True)(params, buffers, batch, seed)
            if kind is None:
                return loss, list(grads), []
            new_params, new_state, cursor = [], [], 0
            count = None if count is None else count + 1
            for p, g, group in zip(params, grads, groups):
                taken = state[cursor:cursor + per_parameter] if (
                    kind != "SGD" or group["momentum"]) else []
                cursor += len(taken)
                value, kept = _update(kind, group, p, g, taken, count, first)
                new_params.append(value)
                new_state += kept
            return loss, new_params, new_state
        return step

    def __call__(self, *batch):
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        names, parameters = [n for n, _ in named], [p for _, p in named]
        # frozen parameters ride along with the buffers: inputs, never differentiated
        frozen = [(n, p.detach()) for n, p in self.model.named_parameters() if not p.requires_grad]
        buffer_names = [n for n, _ in frozen] + [n for n, _ in self.model.named_buffers()]
        buffers = [b for _, b in frozen] + [b for _, b in self.model.named_buffers()]
        state, count, first = self._state(parameters)
        leaves, batch_spec = pytree.tree_flatten(batch)
        hyper = tuple(tuple(sorted((k, v) for k, v in g.items() if k != "params"
                                   and isinstance(v, (int, float, bool, tuple))))
                      for g in (self.optimizer.param_groups if self.optimizer else []))
        key = signature(parameters + buffers + leaves) + (first, hyper, self.model.training,
                                                          str(batch_spec))
        detached = [p.detach() for p in parameters]
        seed = torch.ones((), dtype=torch.float32, device=_device(parameters, leaves))
        inputs = [detached, buffers, state, count, leaves, seed]
        if key not in self.entries:
            function = self._function(names, buffer_names, parameters, first, batch_spec)
            traced = make_fx(functionalize(function), decomposition_table=decomposition_table(),
                             tracing_mode="fake")(*inputs)
            flat = pytree.tree_flatten(inputs)[0]
            compiler = GraphCompiler(self.options, flat)
            executable = compiler.compile_step(traced, flat, seed=len(flat) - 1,
                                               updates=self._updates(inputs, len(parameters),
                                                                     len(state)))
            self.entries[key] = (executable, compiler)
        self.last = key
        executable, _ = self.entries[key]
        with torch.no_grad():   # the program computes its own gradients
            flat = [v.detach() if isinstance(v, torch.Tensor) else v
                    for v in pytree.tree_flatten(inputs)[0]]
            loss, new_params, new_state = self._unpack(executable(flat), len(parameters),
                                                       len(state))
        self._write_back(parameters, new_params, new_state, count)
        return loss

    def _updates(self, inputs, parameter_count: int, state_count: int) -> dict[int, int]:
        """Output position -> input position of each value the step replaces
        (parameters, optimizer state), for the program to update in place."""
        if self.optimizer is None:
            return {}
        state_at = sum(len(part) for part in inputs[:2])
        pairs = {1 + i: i for i in range(parameter_count)}
        pairs.update({1 + parameter_count + j: state_at + j for j in range(state_count)})
        return pairs

    @staticmethod
    def _unpack(outputs, parameter_count, state_count):
        loss = outputs[0]
        return (loss, outputs[1:1 + parameter_count],
                outputs[1 + parameter_count:1 + parameter_count + state_count])

    def _write_back(self, parameters, new_params, new_state, count) -> None:
        with torch.no_grad():
            if self.optimizer is None:   # gradients accumulate as autograd does
                for p, g in zip(parameters, new_params):
                    p.grad = g if p.grad is None else p.grad.add_(g)
                return
            for p, value in zip(parameters, new_params):
                if not _same_memory(p, value):   # not already updated in place
                    p.copy_(value)
            kind = type(self.optimizer).__name__
            cursor = 0
            for p in parameters:
                state = self.optimizer.state[p]
                if kind == "SGD":
                    if _hyper(self.optimizer, p)["momentum"]:
                        state["momentum_buffer"] = new_state[cursor]
                        cursor += 1
                else:
                    for key, value in zip(("exp_avg", "exp_avg_sq"), new_state[cursor:cursor + 2]):
                        if not _same_memory(state[key], value):
                            state[key].copy_(value)
                    cursor += 2
                    state["step"] += 1


def _tied_names(model: torch.nn.Module) -> dict[str, str]:
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


def _device(parameters, leaves) -> torch.device:
    for value in list(parameters) + list(leaves):
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``b`` is ``a``'s memory, shape and strides (the program wrote it in place)."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.device == b.device)


def compile_step(model: torch.nn.Module, loss_fn: Callable, optimizer=None, **options) -> Step:
    """Compile ``loss_fn(model, *batch)``'s training step, optimizer update included.

    Example:
        >>> step = retrograd.compile_step(model, lambda m, x, y: F.cross_entropy(m(x), y),
        ...                               torch.optim.AdamW(model.parameters(), lr=1e-3))
        >>> loss = step(x, y)
    """
    return Step(model, loss_fn, optimizer, Options.from_mapping(options))
