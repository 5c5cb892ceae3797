"""The standalone face's per-call key, made cheaply (compiler/call_key.py, guards.py).

The key and the guards decide whether a compiled program may run again;
their fast versions must mean exactly what the plain ones meant. These
tests compare the module-state key against the plain definition it
replaced (``list(module.modules())``, ``hook_key``, ``tuple(t.shape)``) on
every kind of change, check that each change is caught, compare the guard
shortcut against snapshot equality, and run the compiled module after each
change against eager: a stale program must never run. The call's structure
(tuple or positional, keyword names) is part of the key: a call of the same
tensors in another structure once reused the first structure's program.
"""

from __future__ import annotations

import enum
import math

import numpy
import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn

import retrograd
from checks import RetraceCounter, relative_error
from retrograd.call_key import flatten_call, module_state_key, submodules
from retrograd.guards import _Guard, frozen
from retrograd.hooks import hook_key
from retrograd.reach import MISSING

pytestmark = pytest.mark.usefixtures("no_dump_env")


def plain_state_key(module: nn.Module) -> tuple:
    """The module-state key as trace_cache made it before call_key.py."""
    subs = list(module.modules())
    parameters = [p for sub in subs for p in sub._parameters.values() if p is not None]
    state = parameters + [b for sub in subs for b in sub._buffers.values() if b is not None]
    return (("lifted", ()),
            ("modules", tuple((id(sub), type(sub)) for sub in subs)),
            ("training", tuple(sub.training for sub in subs)),
            ("hooks", hook_key(subs)),
            ("requires_grad", tuple(p.requires_grad for p in parameters)),
            ("state", tuple((id(t), t.dtype, tuple(t.shape), t.device) for t in state)))


def model() -> nn.Module:
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    net = nn.Sequential(shared, nn.ReLU(), nn.LayerNorm(4), shared, nn.BatchNorm1d(4))
    net.register_module("empty", None)
    return net


def _replace(net):
    net[2].weight = nn.Parameter(net[2].weight.detach().clone())


def _global_hook(net):
    return torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)


#: name -> a change to the model that a kept program must not survive
CHANGES = {
    "a replaced parameter": _replace,
    "a converted dtype (same Parameter object)": lambda net: net.double(),
    "a parameter's data of another shape": lambda net: setattr(
        net[2].weight, "data", torch.ones(5)),
    "requires_grad": lambda net: net[2].bias.requires_grad_(False),
    "eval": lambda net: net.eval(),
    "one submodule's training flag": lambda net: net[4].train(False),
    "a swapped submodule without parameters": lambda net: net.__setitem__(1, nn.GELU()),
    "a submodule put in _modules directly": lambda net: net._modules.__setitem__(
        "extra", nn.Tanh()),
    "a child set to None": lambda net: net._modules.__setitem__("1", None),
    "a forward hook": lambda net: net[1].register_forward_hook(lambda m, i, o: o),
    "a forward pre-hook": lambda net: net[0].register_forward_pre_hook(lambda m, i: None),
    "a global forward hook": _global_hook,
    "a new buffer": lambda net: net[1].register_buffer("scale", torch.ones(1)),
    "a replaced buffer": lambda net: setattr(net[4], "running_mean", torch.zeros(4)),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_the_fast_module_key_sees_every_change_the_plain_one_saw(change):
    net = model()
    plain, fast = plain_state_key(net), module_state_key([net], [])
    assert fast == plain   # torch.Size compares (and hashes) as the tuple of its sizes
    assert module_state_key([net], []) == fast
    handle = CHANGES[change](net)
    try:
        assert plain_state_key(net) != plain, change
        assert module_state_key([net], []) != fast, change
        assert module_state_key([net], []) == plain_state_key(net)
    finally:
        if handle is not None and hasattr(handle, "remove"):
            handle.remove()


def test_nothing_changed_keeps_the_key():
    net = model()
    before = module_state_key([net], [])
    net[2](net[0](torch.randn(3, 4))).sum().backward()   # grads and values, not tensors
    with torch.no_grad():
        net[0].weight.mul_(2)
    assert module_state_key([net], []) == before
    assert hash(module_state_key([net], [])) == hash(before)


def test_submodules_walk_as_modules_does():
    net = model()
    net[2].inner = nn.Sequential(net[0], nn.Identity())   # shared deeper in the tree
    assert submodules(net) == list(net.modules())


class Marker(torch.Tensor):
    """A tensor subclass: flattened by pytree, not by the positional shortcut."""


@pytest.mark.parametrize("args, kwargs", [
    ((torch.ones(2), nn.Parameter(torch.ones(3))), {}),
    ((torch.ones(2),), {"b": torch.ones(1)}),
    (((torch.ones(2), torch.ones(1)),), {}),
    ((torch.ones(2), 3, None), {}),
    ((torch.ones(2).as_subclass(Marker),), {}),
    ((), {}),
])
def test_flatten_call_gives_pytrees_leaves(args, kwargs):
    leaves, structure, in_spec = flatten_call(args, kwargs)
    want, spec = pytree.tree_flatten((args, kwargs))
    assert len(leaves) == len(want) and all(a is b for a, b in zip(leaves, want))
    plain = all(type(a) in (torch.Tensor, nn.Parameter) for a in args) and not kwargs
    assert (structure == len(args) and in_spec is None) if plain else (in_spec == spec)


def call_as_a_tuple_or_not(a, b=None):
    if isinstance(a, tuple):
        return a[0] * 2 + a[1]
    return a - b


def by_keyword(a=None, b=None):
    return a * 2 if a is not None else b * 3


def test_the_call_structure_is_part_of_the_key():
    """Same tensors, same signature, another structure: a program of its own
    (failed before: the tuple call ran ``a - b``, the keyword call ``a * 2``)."""
    x, y = torch.randn(3), torch.randn(3)
    compiled = retrograd.compile(call_as_a_tuple_or_not, executor="fx")
    assert relative_error(compiled(x, y), x - y) < 1e-6
    assert relative_error(compiled((x, y)), x * 2 + y) < 1e-6
    assert relative_error(compiled(x, y), x - y) < 1e-6
    keyword = retrograd.compile(by_keyword, executor="fx")
    assert relative_error(keyword(a=x), x * 2) < 1e-6
    assert relative_error(keyword(b=x), x * 3) < 1e-6


class Mode(enum.Enum):
    A = 1
    B = 2


@pytest.mark.parametrize("traced, now", [
    (1, 1), (1, 1.0), (1, True), (True, 1), (1.0, 1), (0.5, 0.5), (math.nan, math.nan),
    ("a", "a"), ("a", "b"), (None, None), (None, 0), (Mode.A, Mode.A), (Mode.A, 1),
    (torch.float32, torch.float32), (torch.float32, torch.float64),
    (numpy.float32(1.5), numpy.float32(1.5)), (numpy.float32(1.5), 1.5),
    ((1, 2), (1, 2)), ((1, 2), [1, 2]), (b"x", b"x"),
])
def test_the_guard_shortcut_is_snapshot_equality(traced, now):
    guard = _Guard("value", lambda: traced, frozen(traced))
    assert guard.holds() == (frozen(traced) == guard.value)
    guard.get = lambda: now
    assert guard.holds() == (frozen(now) == frozen(traced))
    nan = math.nan
    same = _Guard("nan", lambda: nan, frozen(nan))
    assert same.holds()   # the same object: equal by identity, as a tuple compares


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.scale = 1

    def forward(self, x):
        return self.linear(x) * (2 if self.scale is True else self.scale)


def test_a_value_equal_but_of_another_type_traces_again(monkeypatch):
    traces = RetraceCounter(monkeypatch)
    torch.manual_seed(0)
    net = Scaled()
    compiled = retrograd.compile(net, executor="fx")
    x = torch.randn(2, 4)
    for scale, calls in [(1, 1), (1, 1), (True, 2), (1, 2), (1.0, 3)]:
        net.scale = scale
        with torch.no_grad():
            assert relative_error(compiled(x), net(x)) < 1e-6
        assert traces.calls == calls, scale


#: changes a compiled copy of ``small()`` must retrace after (shapes its forward still takes)
RUNNABLE = {
    "a converted dtype": lambda net: net.double(),
    "a bias's data of another shape": lambda net: setattr(net[3].bias, "data", torch.ones(1)),
    "eval": lambda net: net.eval(),
    "a swapped submodule without parameters": lambda net: net.__setitem__(1, nn.GELU()),
    "a replaced parameter": _replace,
    "requires_grad": lambda net: net[0].weight.requires_grad_(False),
}


@pytest.mark.parametrize("change", sorted(RUNNABLE))
def test_after_each_change_the_compiled_module_matches_eager(change, monkeypatch):
    traces = RetraceCounter(monkeypatch)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.LayerNorm(4), nn.Linear(4, 3))
    compiled = retrograd.compile(net, executor="fx")
    x = torch.randn(2, 4)
    assert relative_error(compiled(x), net(x)) < 1e-6
    RUNNABLE[change](net)
    x = x.to(net[0].weight.dtype)
    assert relative_error(compiled(x), net(x)) < 1e-6
    assert traces.calls == 2


@pytest.mark.parametrize("shape_of_output", [
    lambda y: y, lambda y: (y,), lambda y: [y], lambda y: {"y": y}, lambda y: (y, 3),
    lambda y: (y, y + 1),
])
def test_outputs_keep_their_structure(shape_of_output):
    """One tensor out is returned as it is (no pytree rebuild); every other
    structure is rebuilt as eager returns it."""
    def function(x):
        return shape_of_output(x * 2)
    compiled = retrograd.compile(function, executor="fx")
    x = torch.randn(3)
    for _ in range(2):
        got, want = compiled(x), function(x)
        assert pytree.tree_structure(got) == pytree.tree_structure(want)
        assert all(relative_error(a, b) < 1e-6 if isinstance(a, torch.Tensor) else a == b
                   for a, b in zip(pytree.tree_leaves(got), pytree.tree_leaves(want)))


def test_a_guarded_value_that_no_longer_reads_has_changed():
    def gone():
        raise AttributeError("deleted")
    guard = _Guard("attribute", lambda: 1.5, frozen(1.5))
    assert guard.holds()
    guard.get = gone
    assert not guard.holds()
    missing = _Guard("attribute", gone, frozen(MISSING))   # absent when traced, still absent
    assert missing.holds()
