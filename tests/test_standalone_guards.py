"""The standalone face and Python state: guards, data-dependent code, hooks.

``retrograd.compile`` traces the call once per signature, baking in every
Python value the code reads. These tests change such values after the first
call (a module's temperature, a flag, a submodule's slope, a float a
function closes over, a global, a plain config object's field, a constant
tensor updated in place) and check the result against eager: the trace must
run again, and run only then. Code that needs tensor values while tracing
must end in ``retrograd.UnsupportedError`` naming the op and the line, and
run through ``torch.compile(backend="retrograd")``. Hooks run only while
tracing and are warned about once each.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import retrograd
from checks import RetraceCounter, relative_error

pytestmark = pytest.mark.usefixtures("no_dump_env")

HERE = Path(__file__).resolve()


@pytest.fixture
def traces(monkeypatch) -> RetraceCounter:
    """Counts the graphs compiled (``traces.calls``)."""
    return RetraceCounter(monkeypatch)


def line_of(marker: str) -> int:
    """The line of this file that holds ``marker`` (once)."""
    (number,) = [i for i, line in enumerate(HERE.read_text().splitlines(), 1)
                 if marker in line and "line_of(" not in line]
    return number


def value_and_input_grad(function, x: torch.Tensor):
    leaf = x.detach().clone().requires_grad_(True)
    out = function(leaf)
    (grad,) = torch.autograd.grad((out * torch.linspace(0.5, 1.5, out.numel()).view(out.shape))
                                  .sum(), leaf)
    return out.detach(), grad


def assert_matches_eager(compiled, eager, x: torch.Tensor) -> None:
    got, got_grad = value_and_input_grad(compiled, x)
    want, want_grad = value_and_input_grad(eager, x)
    assert relative_error(got, want) < 1e-5
    assert relative_error(got_grad, want_grad) < 1e-5


# -- 1. module attributes ---------------------------------------------------------------------

class Tempered(nn.Module):
    """Python attributes read in forward: a float, a bool, an int and a string."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.act = nn.LeakyReLU(0.1)
        self.temperature = 1.0
        self.clip = True
        self.power = 2
        self.mode = "tanh"

    def forward(self, x):
        y = self.act(self.linear(x)) / self.temperature
        y = y.clamp(-0.5, 0.5) if self.clip else y
        y = y ** self.power
        return y.tanh() if self.mode == "tanh" else y.sigmoid()


@pytest.mark.parametrize("attribute, value", [
    ("temperature", 3.0), ("clip", False), ("power", 3), ("mode", "sigmoid"),
    ("act.negative_slope", 0.4)])
def test_a_changed_module_attribute_traces_again(attribute, value, traces):
    torch.manual_seed(0)
    model = Tempered()
    compiled = retrograd.compile(model, executor="fx")
    x = torch.randn(3, 4)
    assert_matches_eager(compiled, model, x)
    owner, name = (model.act, "negative_slope") if "." in attribute else (model, attribute)
    original = getattr(owner, name)
    setattr(owner, name, value)
    assert_matches_eager(compiled, model, x)
    assert traces.calls == 2
    setattr(owner, name, original)     # back to the first values: the first graph again
    assert_matches_eager(compiled, model, x)
    assert traces.calls == 2


def test_a_swapped_submodule_without_parameters_traces_again(traces):
    """``model.act = nn.Tanh()`` changes no parameter, buffer or plain attribute:
    the submodule's identity is part of the cache key."""
    torch.manual_seed(0)
    model = Tempered()
    compiled = retrograd.compile(model, executor="fx")
    x = torch.randn(3, 4)
    assert_matches_eager(compiled, model, x)
    model.act = nn.Tanh()
    assert_matches_eager(compiled, model, x)
    assert traces.calls == 2


def test_unchanged_attributes_reuse_the_graph(traces):
    torch.manual_seed(0)
    model = Tempered()
    compiled = retrograd.compile(model, executor="fx")
    for _ in range(3):
        assert_matches_eager(compiled, model, torch.randn(3, 4))
    assert traces.calls == 1


def test_modules_a_function_reaches_are_guarded(traces):
    """The same guards for a module used by a compiled function (under no_grad,
    where its parameters may be constants) and by ``retrograd.grad``."""
    torch.manual_seed(0)
    model = Tempered()
    x = torch.randn(3, 4)

    def function(x):
        return model(x) * 2

    compiled = retrograd.compile(function, executor="fx")
    with torch.no_grad():
        assert relative_error(compiled(x), function(x)) < 1e-6
        model.temperature = 4.0
        assert relative_error(compiled(x), function(x)) < 1e-6
    assert traces.calls == 2

    def loss(x):
        return model(x).square().sum()

    gradient = retrograd.grad(loss, executor="fx")
    assert relative_error(gradient(x), torch.func.grad(loss)(x)) < 1e-5
    model.mode = "sigmoid"
    assert relative_error(gradient(x), torch.func.grad(loss)(x)) < 1e-5
    assert traces.calls == 4


def test_a_compiled_function_lifts_the_model_it_reaches(traces):
    """``retrograd.compile(lambda x: models["net"](x))`` trains the model like
    eager (its parameters are graph inputs, not constants), and a replaced
    parameter traces again."""
    torch.manual_seed(0)
    models = {"net": nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))}
    reference = copy.deepcopy(models["net"])

    def function(x):
        return models["net"](x) * 2

    compiled = retrograd.compile(function, executor="fx")
    x = torch.randn(5, 4)
    compiled(x).square().sum().backward()
    (reference(x) * 2).square().sum().backward()
    for mine, theirs in zip(models["net"].parameters(), reference.parameters()):
        assert relative_error(mine.grad, theirs.grad) < 1e-5
    replacement = torch.randn(3, 4)
    models["net"][0].weight = nn.Parameter(replacement.clone())
    reference[0].weight = nn.Parameter(replacement.clone())
    assert relative_error(compiled(x), reference(x) * 2) < 1e-6
    assert traces.calls == 2


def test_an_attribute_changed_by_the_trace_itself_is_warned_about(traces):
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return x.sin()

    model = Counting()
    compiled = retrograd.compile(model, executor="fx")
    with pytest.warns(UserWarning, match=r"changed attribute Counting\.calls while it was "
                                         r"traced.*torch\.compile"):
        compiled(torch.randn(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled(torch.randn(3))   # no retrace loop on the counter's new value
    assert traces.calls == 1


# -- 2. what a function reads by name -----------------------------------------------------

SCALE = 2.0
USE_COS = False


def global_reader(x):
    return (x.cos() if USE_COS else x.sin()) * SCALE


def test_a_changed_global_traces_again(traces, monkeypatch):
    compiled = retrograd.compile(global_reader, executor="fx")
    x = torch.randn(5)
    assert_matches_eager(compiled, global_reader, x)
    monkeypatch.setitem(globals(), "SCALE", -0.5)
    assert_matches_eager(compiled, global_reader, x)
    monkeypatch.setitem(globals(), "USE_COS", True)
    assert_matches_eager(compiled, global_reader, x)
    assert traces.calls == 3


def test_a_value_changing_on_every_call_keeps_a_bounded_cache(traces):
    step = 0.0

    def function(x):
        return x * step

    compiled = retrograd.compile(function, executor="fx")
    x = torch.randn(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for value in range(10):
            step = float(value)
            assert relative_error(compiled(x), function(x)) < 1e-6
    (message,) = [str(w.message) for w in caught if "traced more than" in str(w.message)]
    assert "traced more than 8 times" in message and "'step'" in message
    assert traces.calls == 10
    assert [len(kept) for kept in compiled._cache.entries.values()] == [8]


def test_a_changed_closed_over_float_traces_again(traces):
    scale = 2.0

    def function(x):
        return x.tanh() * scale

    compiled = retrograd.compile(function, executor="fx")
    x = torch.randn(5)
    assert_matches_eager(compiled, function, x)
    scale = 5.0   # read by function through its closure cell
    assert_matches_eager(compiled, function, x)
    assert traces.calls == 2


def test_helpers_and_plain_objects_are_followed(traces):
    class Config:
        def __init__(self):
            self.shift = 0.5
            self.unused = [1, 2]

    config = Config()
    offset = [0.25]

    def helper(x):
        return x + config.shift

    def function(x):
        return helper(x).exp() * offset[0]

    compiled = retrograd.compile(function, executor="fx")
    x = torch.randn(4)
    assert_matches_eager(compiled, function, x)
    config.shift = -1.0
    assert_matches_eager(compiled, function, x)
    offset[0] = 3.0
    assert_matches_eager(compiled, function, x)
    assert traces.calls == 3
    config.unused.append(3)   # not named by the code: no guard, no retrace
    assert_matches_eager(compiled, function, x)
    assert traces.calls == 3


def test_a_constant_tensor_updated_in_place_traces_again(traces):
    bias = torch.linspace(-1, 1, 6)

    def function(x):
        return (x + bias).sigmoid()

    compiled = retrograd.compile(function, executor="fx")
    x = torch.randn(6)
    assert_matches_eager(compiled, function, x)
    bias.mul_(-3.0)
    assert_matches_eager(compiled, function, x)
    assert traces.calls == 2


def test_data_too_large_to_guard_is_a_clear_error():
    weights = [0.5] * 2000

    def function(x):
        return x * weights[3]

    with pytest.raises(retrograd.UnsupportedError, match=r"closure variable 'weights'.*more "
                                                         r"than 1024 values.*tensor"):
        retrograd.compile(function, executor="fx")(torch.randn(3))

    class Weighted(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = list(range(2000))

        def forward(self, x):
            return x * self.table[5]

    with pytest.raises(retrograd.UnsupportedError, match=r"attribute Weighted\.table"):
        retrograd.compile(Weighted(), executor="fx")(torch.randn(3))


# -- 3. data-dependent code --------------------------------------------------------------------

def branch_on_a_value(y):
    return (y * 2 if y.sum() > 0 else y * 3).sin()   # marker: branch


def read_item(y):
    return y.sin() * y.sum().item()   # marker: item


def boolean_mask(y):
    return y[y > 0].sin().sum() + y.cos()   # marker: mask


def call_nonzero(y):
    return torch.nonzero(y > 0).sum() * y.sin()   # marker: nonzero


DATA_DEPENDENT = {
    "branch": (branch_on_a_value, "aten._local_scalar_dense"),
    "item": (read_item, "aten._local_scalar_dense"),
    "mask": (boolean_mask, "aten.nonzero"),
    "nonzero": (call_nonzero, "aten.nonzero"),
}


@pytest.mark.parametrize("case", list(DATA_DEPENDENT))
def test_data_dependent_code_is_an_unsupported_error_naming_op_and_line(case):
    function, op = DATA_DEPENDENT[case]
    y = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(retrograd.UnsupportedError) as raised:
        retrograd.compile(function, executor="fx", data_dependent="error")(y)
    message = str(raised.value)
    assert op in message
    assert f"{HERE}:{line_of(f'# marker: {case}')}" in message
    assert 'torch.compile(..., backend="retrograd")' in message
    assert message.startswith(f"retrograd.compile of {function.__name__}: ")
    assert isinstance(raised.value, RuntimeError)
    with pytest.raises(retrograd.UnsupportedError, match=rf"^retrograd\.grad of .*<lambda>: {op}"):
        retrograd.grad(lambda y: function(y).sum(), executor="fx")(y)


@pytest.mark.parametrize("case", list(DATA_DEPENDENT))
def test_data_dependent_code_runs_under_torch_compile(case, fresh_dynamo):
    function, _ = DATA_DEPENDENT[case]
    torch.manual_seed(0)
    compiled = torch.compile(function, backend="retrograd")
    for _ in range(2):   # both branches of the value test
        assert_matches_eager(compiled, function, torch.randn(3, 4))


@pytest.mark.parametrize("case", list(DATA_DEPENDENT))
def test_data_dependent_code_is_split_by_dynamo_by_default(case, fresh_dynamo):
    """By default the standalone face hands such code to torch.compile's face
    (dynamo_fallback.py) after a warning naming the op and the line; values and
    gradients equal eager's, for both sides of a value test, and the reports are
    those of a graph retrograd compiled."""
    function, op = DATA_DEPENDENT[case]
    compiled = retrograd.compile(function)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=rf"{op}.* at {HERE}:{line_of(f'# marker: {case}')}"
                                         r".*torch\.compile"):
        assert_matches_eager(compiled, function, torch.randn(3, 4))
    assert_matches_eager(compiled, function, -torch.randn(3, 4).abs())
    assert compiled.reports["forward"]["graph"]


def test_a_transformers_mask_helper_names_its_line():
    """transformers' SDPA mask helper asks ``mask.all()`` of a padding mask."""
    from zoo import _gpt2_model
    model = _gpt2_model()
    model.config._attn_implementation = "sdpa"
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    with pytest.raises(retrograd.UnsupportedError,
                       match=r"aten\._local_scalar_dense.* at .*masking_utils\.py:\d+"):
        retrograd.compile(model, executor="fx", data_dependent="error")(
            input_ids=ids, attention_mask=mask)


# -- 4. hooks --------------------------------------------------------------------------------

def record_output(module, inputs, output):
    RECORDED.append(type(output).__name__)


def double_output(module, inputs, output):
    return output * 2


RECORDED: list = []


def test_hooks_warn_once_each_naming_the_hook_and_module(traces):
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].register_forward_hook(record_output)
    model[2].register_forward_pre_hook(lambda module, args: None)
    model[2].register_full_backward_hook(lambda module, grad_in, grad_out: None)
    compiled = retrograd.compile(model, executor="fx")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(torch.randn(3, 4, requires_grad=True)).sum().backward()
        compiled(torch.randn(5, 4, requires_grad=True)).sum().backward()   # traces again
    messages = [str(w.message) for w in caught if "runs only while" in str(w.message)]
    assert traces.calls == 2 and len(messages) == 3, messages
    assert any("forward hook 'record_output' on Sequential.0 (Linear)" in m for m in messages)
    assert any("forward pre-hook" in m and "<lambda>" in m and "on Sequential.2 (Linear)" in m
               for m in messages)
    assert any("backward hook" in m and "on Sequential.2 (Linear)" in m for m in messages)
    assert all(m.startswith("retrograd.compile") and "torch.compile" in m for m in messages)
    assert all(Path(w.filename).resolve() == HERE for w in caught
               if "runs only while" in str(w.message))


def test_a_hook_added_or_removed_after_the_first_call_traces_again(traces):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    compiled = retrograd.compile(model, executor="fx")
    x = torch.randn(3, 4)
    assert_matches_eager(compiled, model, x)
    handle = model[0].register_forward_hook(double_output)
    with pytest.warns(UserWarning, match="forward hook 'double_output' on Sequential.0"):
        assert_matches_eager(compiled, model, x)
    handle.remove()
    assert_matches_eager(compiled, model, x)
    assert traces.calls == 2   # the hookless graph is reused
    with torch.no_grad():
        assert relative_error(compiled(x), model(x)) < 1e-6


def masked_accumulate(x, v):
    mask = torch.tensor([True, False, True, False, True])
    return torch.index_put(x * 2, [mask], v.sin(), accumulate=True).cos()


@pytest.mark.parametrize("face", ["standalone", "torch.compile"])
def test_a_graph_reading_values_inside_an_op_runs_in_eager_and_says_so(face, fresh_dynamo):
    """Dynamo cannot split inside ``index_put``, whose decomposition calls
    ``nonzero`` on the mask: that graph runs in eager PyTorch (backend.EagerGraph),
    with a warning naming the op, and a report with no Triton kernel."""
    x, v = torch.randn(5, 5, requires_grad=True), torch.randn(5, requires_grad=True)
    upstream = torch.randn(5, 5)
    expected = torch.autograd.grad(masked_accumulate(x, v), (x, v), upstream)
    compiled = (retrograd.compile(masked_accumulate) if face == "standalone"
                else torch.compile(masked_accumulate, backend="retrograd"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.autograd.grad(compiled(x, v), (x, v), upstream)
    assert any("aten.nonzero" in str(w.message) and "runs in eager" in str(w.message)
               for w in caught), [str(w.message) for w in caught]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
    if face == "standalone":
        report = compiled.reports["eager"]
        assert report["kernels"]["triton"] == 0 and report["kernels"]["extern"] > 0
