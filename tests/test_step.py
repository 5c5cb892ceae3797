"""retrograd.compile_step: a whole training step as one program, against an
eager loop (zero_grad, forward, backward, step) over several steps."""

import copy

import pytest
import torch
import torch.nn.functional as F

import retrograd
import retrograd.step
import retrograd.step_function
from checks import eager_step, relative_error


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # no bias right before BatchNorm: its true gradient is zero, and Adam's
    # update of a noise-level gradient is +-lr by the noise's sign
    return torch.nn.Sequential(torch.nn.Linear(8, 16, bias=False), torch.nn.BatchNorm1d(16),
                               torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _loss(model, x, y):
    return F.cross_entropy(model(x), y)


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
    "sgd-nesterov-dampening": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8,
                                                         nesterov=True),
    "sgd-dampening": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, dampening=0.3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.01),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.05),
    "adam-two-groups": lambda ps: torch.optim.Adam(
        [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.003}], lr=0.01),
}


def _assert_same_parameters(compiled_model, eager_model) -> None:
    for p, q in zip(compiled_model.parameters(), eager_model.parameters(), strict=True):
        assert relative_error(p.detach(), q.detach()) < 1e-5


def test_parameter_comparisons_fail_on_a_missing_parameter():
    """The comparisons here zip strictly: a model with a layer fewer is a
    failure, not a shorter comparison that passes on the layers both have."""
    _assert_same_parameters(_model(), _model())
    with pytest.raises(ValueError, match="zip"):
        _assert_same_parameters(_model(), _model()[:3])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_steps_match_an_eager_loop(name):
    compiled_model, eager_model = _model(), _model()
    make = OPTIMIZERS[name]
    compiled_opt = make(list(compiled_model.parameters()))
    eager_opt = make(list(eager_model.parameters()))
    step = retrograd.compile_step(compiled_model, _loss, compiled_opt)
    torch.manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
        loss = step(x, y)
        reference = eager_step(eager_model, eager_opt, _loss, x, y)
        assert relative_error(loss.detach(), reference.detach()) < 1e-5
    _assert_same_parameters(compiled_model, eager_model)
    for p, q in zip(compiled_model.parameters(), eager_model.parameters(), strict=True):
        assert compiled_opt.state[p].keys() == eager_opt.state[q].keys()
        for key, value in eager_opt.state[q].items():
            mine = compiled_opt.state[p][key]
            assert relative_error(mine, value) < 1e-5
    for a, b in zip(compiled_model.buffers(), eager_model.buffers(), strict=True):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6)   # BatchNorm stats
    report = step.reports["step"]
    assert report["graph"] == "step" and report["kernels"]["triton"] >= 1


def test_without_an_optimizer_gradients_accumulate_in_grad():
    compiled_model, eager_model = _model(), _model()
    step = retrograd.compile_step(compiled_model, _loss)
    for _ in range(2):   # no zero_grad: accumulates, as autograd does
        x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
        step(x, y)
        _loss(eager_model, x, y).backward()
    for p, q in zip(compiled_model.parameters(), eager_model.parameters(), strict=True):
        assert relative_error(p.grad, q.grad) < 1e-5


def test_a_learning_rate_change_does_not_recompile():
    """The learning rate is an input of the program, not a constant in it."""
    model, eager = _model(), _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    eager_opt = torch.optim.SGD(eager.parameters(), lr=0.1)
    step = retrograd.compile_step(model, _loss, optimizer)
    x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
    for lr in (0.1, 0.01, 0.3):
        for group in optimizer.param_groups + eager_opt.param_groups:
            group["lr"] = lr
        step(x, y)
        eager_step(eager, eager_opt, _loss, x, y)
    assert len(step.entries) == 1
    _assert_same_parameters(model, eager)


def test_unsupported_optimizer_is_a_clear_error():
    model = _model()
    with pytest.raises(ValueError, match="RMSprop is not supported; supported: SGD, Adam, AdamW"):
        retrograd.compile_step(model, _loss, torch.optim.RMSprop(model.parameters()))
    with pytest.raises(ValueError, match="capturable=True is not supported"):
        retrograd.compile_step(model, _loss, torch.optim.Adam(model.parameters(),
                                                              capturable=True))


def test_a_loss_that_is_not_a_scalar_is_a_clear_error():
    model = _model()
    step = retrograd.compile_step(model, lambda m, x: m(x), torch.optim.SGD(model.parameters(),
                                                                              lr=0.1))
    with pytest.raises(ValueError, match="loss_fn must return a scalar tensor"):
        step(torch.randn(6, 8))


def test_frozen_parameters_stay_put_and_the_rest_train():
    compiled_model, eager_model = _model(), _model()
    for model in (compiled_model, eager_model):
        model[0].weight.requires_grad_(False)
    compiled_opt = torch.optim.SGD([p for p in compiled_model.parameters() if p.requires_grad],
                                   lr=0.1)
    eager_opt = torch.optim.SGD([p for p in eager_model.parameters() if p.requires_grad], lr=0.1)
    step = retrograd.compile_step(compiled_model, _loss, compiled_opt)
    for _ in range(2):
        x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
        step(x, y)
        eager_step(eager_model, eager_opt, _loss, x, y)
    _assert_same_parameters(compiled_model, eager_model)


def _program_of(step):
    """The Program of a Step's last signature."""
    executable, _ = step.entries[step.last]
    return executable.program


@pytest.mark.parametrize("name", ["sgd-momentum", "adamw"])
def test_parameters_and_state_are_updated_in_place(name):
    """Every new parameter and state tensor is written over the old one inside
    the program (no second copy of the model), and the values stay right."""
    model = _model()
    optimizer = OPTIMIZERS[name](list(model.parameters()))
    step = retrograd.compile_step(model, _loss, optimizer)
    torch.manual_seed(1)
    x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
    step(x, y)                                       # creates the optimizer state
    pointers = {id(p): p.data_ptr() for p in model.parameters()}
    state = {(id(p), k): v.data_ptr() for p in model.parameters()
             for k, v in optimizer.state[p].items() if k != "step"}
    step(x, y)
    step(x, y)
    program = _program_of(step)
    stats = next(p["stats"] for p in step.reports["step"]["passes"] if p["name"] == "buffer_reuse")
    expected = len(pointers) + len(state)
    assert stats["updates_in_place"] == expected and stats["updates_out_of_place"] == 0
    assert len(program.updates) == expected
    assert all(program.buffers[out].reuses == source for out, source in program.updates.items())
    assert {id(p): p.data_ptr() for p in model.parameters()} == pointers
    assert {(id(p), k): v.data_ptr() for p in model.parameters()
            for k, v in optimizer.state[p].items() if k != "step"} == state


def test_the_step_places_checkpoints_and_keeps_phases_apart():
    """Inside the one graph the forward hands the backward fewer bytes than
    saving everything, recomputed values carry the backward phase, and no
    kernel mixes forward and backward nodes."""
    from retrograd.passes.op_classes import PHASE
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.LayerNorm(16),
                                torch.nn.Linear(16, 3))
    step = retrograd.compile_step(model, _loss, torch.optim.SGD(model.parameters(), lr=0.1))
    step(torch.randn(6, 8), torch.randint(0, 3, (6,)))
    stats = next(p["stats"] for p in step.reports["step"]["passes"] if p["name"] == "checkpoint")
    assert stats["saved_activation_bytes"] < stats["save_all_bytes"]
    assert stats["recomputed_nodes"] > 0
    program = _program_of(step)
    recomputed = 0
    for kernel in program.kernels_of("triton"):
        phases = {node.meta.get(PHASE) for node in kernel.nodes}
        assert len(phases) == 1, (kernel.name, phases)
        recomputed += any(node.name.endswith("_recomputed") for node in kernel.nodes)
        if any(node.name.endswith("_recomputed") for node in kernel.nodes):
            assert phases == {"backward"}
    assert recomputed > 0


def test_the_loss_seed_is_folded_as_the_constant_one():
    model = _model()
    step = retrograd.compile_step(model, _loss, torch.optim.SGD(model.parameters(), lr=0.1))
    step(torch.randn(6, 8), torch.randint(0, 3, (6,)))
    program = _program_of(step)
    seed = program.inputs[-1]
    assert not any(seed in kernel.inputs for kernel in program.kernels)


class _TiedLM(torch.nn.Module):
    """An embedding whose weight the output layer shares (as GPT-2's does)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6)
        self.mix = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def test_tied_parameters_are_replaced_under_every_name(monkeypatch):
    """The ties are looked up while tracing only: a step that reuses its
    program does not walk the model for them again."""
    looked_up = []
    real = retrograd.step_function.tied_names
    monkeypatch.setattr(retrograd.step_function, "tied_names",
                        lambda model: looked_up.append(1) or real(model))
    torch.manual_seed(0)
    compiled_model = _TiedLM()
    eager_model = _TiedLM()
    eager_model.load_state_dict(compiled_model.state_dict())

    def loss(model, ids):
        return F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    make = OPTIMIZERS["sgd-momentum"]
    compiled_opt = make(list(compiled_model.parameters()))
    eager_opt = make(list(eager_model.parameters()))
    step = retrograd.compile_step(compiled_model, loss, compiled_opt)
    for call in range(3):
        ids = torch.randint(0, 11, (2, 5))
        got = step(ids)
        expected = eager_step(eager_model, eager_opt, loss, ids)
        assert relative_error(got.detach(), expected.detach()) < 1e-5
        if call == 0:
            traced = len(looked_up)
    assert traced and len(looked_up) == traced
    assert compiled_model.head.weight is compiled_model.embed.weight
    _assert_same_parameters(compiled_model, eager_model)


def test_a_memory_budget_applies_to_the_step():
    """memory_budget plans the step's forward-to-backward crossing as it does a
    split graph's; the step still matches eager."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 32),
                                torch.nn.Tanh(), torch.nn.Linear(32, 3))
    eager = copy.deepcopy(model)
    step = retrograd.compile_step(model, _loss, torch.optim.SGD(model.parameters(), lr=0.1),
                                  memory_budget=0.3)
    optimizer = torch.optim.SGD(eager.parameters(), lr=0.1)
    x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
    got = step(x, y)
    expected = eager_step(eager, optimizer, _loss, x, y)
    assert relative_error(got.detach(), expected.detach()) < 1e-5
    _assert_same_parameters(model, eager)
    stats = next(p["stats"] for p in step.reports["step"]["passes"] if p["name"] == "checkpoint")
    assert stats["plan"] == "memory_budget=0.3"
    assert stats["saved_activation_bytes"] <= stats["budget_bytes"] < stats["save_all_bytes"]
