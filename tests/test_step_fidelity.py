"""compile_step against an eager loop where the two used to differ (issue 10,
defect 5): every optimizer flag read (not the class name), parameters
without a gradient left alone, hyperparameters as program inputs (a
schedule does not recompile), non-floating losses refused, and
``max_grad_norm`` clipping as ``clip_grad_norm_`` does. Each test runs
several steps and compares parameters and optimizer state."""

import pytest
import torch
import torch.nn.functional as F

import retrograd
from checks import relative_error


class _Net(torch.nn.Module):
    """Linear-tanh-Linear, plus a layer the loss never uses and a scale used
    only through ``detach`` (eager leaves both their ``.grad`` None)."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(8, 16)
        self.head = torch.nn.Linear(16, 3)
        self.unused = torch.nn.Linear(8, 3)
        self.scale = torch.nn.Parameter(torch.full((16,), 1.5))

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)) * self.scale.detach())


def _pair():
    torch.manual_seed(0)
    compiled = _Net()
    eager = _Net()
    eager.load_state_dict(compiled.state_dict())
    return compiled, eager


def _loss(model, x, y):
    return F.cross_entropy(model(x), y)


def _assert_match(compiled, compiled_opt, eager, eager_opt) -> None:
    """Same parameters, and the same optimizer state under the same keys (none
    at all for a parameter that never had a gradient)."""
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        assert relative_error(p.detach(), q.detach()) < 1e-5, name
        mine, theirs = compiled_opt.state.get(p, {}), eager_opt.state.get(q, {})
        assert set(mine) == set(theirs), (name, set(mine), set(theirs))
        for key, value in theirs.items():
            assert relative_error(mine[key], value) < 1e-5, (name, key)


def _train(make, steps=4, max_grad_norm=None, schedule=None, each_step=None):
    """Run compile_step and the eager loop side by side; return the Step."""
    compiled, eager = _pair()
    compiled_opt, eager_opt = make(compiled), make(eager)
    options = {} if max_grad_norm is None else {"max_grad_norm": max_grad_norm}
    step = retrograd.compile_step(compiled, _loss, compiled_opt, **options)
    schedulers = [schedule(o) for o in (compiled_opt, eager_opt)] if schedule else []
    torch.manual_seed(1)
    for index in range(steps):
        if each_step is not None:
            for optimizer in (compiled_opt, eager_opt):
                each_step(optimizer, index)
        x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
        loss = step(x, y)
        eager_opt.zero_grad()
        reference = _loss(eager, x, y)
        reference.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(eager.parameters(), max_grad_norm)
        eager_opt.step()
        for scheduler in schedulers:
            scheduler.step()
        assert relative_error(loss.detach(), reference.detach()) < 1e-5
    _assert_match(compiled, compiled_opt, eager, eager_opt)
    assert compiled.unused.weight.grad is None and not compiled_opt.state.get(
        compiled.unused.weight)
    return step


FLAGS = {
    "adam-decoupled": lambda m: torch.optim.Adam(m.parameters(), lr=0.02, weight_decay=0.5,
                                                 decoupled_weight_decay=True),
    "adamw-coupled": lambda m: torch.optim.Adam(m.parameters(), lr=0.02, weight_decay=0.5),
    "adam-maximize": lambda m: torch.optim.Adam(m.parameters(), lr=0.01, maximize=True),
    "adamw-amsgrad": lambda m: torch.optim.AdamW(m.parameters(), lr=0.02, amsgrad=True,
                                                 betas=(0.5, 0.6)),
    "adam-foreach": lambda m: torch.optim.Adam(m.parameters(), lr=0.01, foreach=True),
    "adamw-fused": lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, fused=True),
    "sgd-maximize": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9,
                                              weight_decay=0.1, maximize=True),
    "sgd-dampening": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9,
                                               dampening=0.5),
    "sgd-nesterov-decay": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9,
                                                    nesterov=True, weight_decay=0.1),
}


@pytest.mark.parametrize("name", list(FLAGS))
def test_optimizer_flags_match_an_eager_loop(name):
    """The update follows each flag (Adam with decoupled_weight_decay=True is
    AdamW, not L2 Adam), and parameters without a gradient get neither weight
    decay nor momentum nor state."""
    step = _train(FLAGS[name])
    assert len(step.entries) == 1   # SGD's first momentum step is no second program


def _refusal(make, flag):
    model = _Net()
    with pytest.raises(ValueError, match=flag):
        retrograd.compile_step(model, _loss, make(model))


def test_flags_that_are_not_implemented_are_refused_by_name():
    _refusal(lambda m: torch.optim.Adam(m.parameters(), capturable=True), "capturable=True")
    _refusal(lambda m: torch.optim.SGD(m.parameters(), lr=0.1, differentiable=True),
             "differentiable=True")
    _refusal(lambda m: torch.optim.Adam(m.parameters(), lr=torch.tensor(0.01)), "tensor lr")

    def unknown(model):   # a flag a newer torch might add
        optimizer = torch.optim.AdamW(model.parameters())
        optimizer.defaults["cautious"] = True
        return optimizer
    _refusal(unknown, "'cautious' is not known")


def test_a_flag_changed_after_compiling_is_checked_again():
    model = _Net()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    step = retrograd.compile_step(model, _loss, optimizer)
    optimizer.param_groups[0]["differentiable"] = True
    with pytest.raises(ValueError, match="differentiable=True"):
        step(torch.randn(6, 8), torch.randint(0, 3, (6,)))


def test_without_an_optimizer_unreached_parameters_keep_no_grad():
    compiled, eager = _pair()
    step = retrograd.compile_step(compiled, _loss)
    x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
    step(x, y)
    _loss(eager, x, y).backward()
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            assert relative_error(p.grad, q.grad) < 1e-5, name


@pytest.mark.filterwarnings(r"error:Detected call of `lr_scheduler.step\(\)`")
def test_one_cycle_schedule_with_adam_compiles_once():
    """OneCycleLR changes lr and beta1 every step; weight decay changes too."""
    def decay(optimizer, index):
        optimizer.param_groups[0]["weight_decay"] = 0.05 * (index + 1)
    step = _train(lambda m: torch.optim.AdamW(m.parameters(), lr=0.01),
                  schedule=lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 0.05, total_steps=8),
                  steps=6, each_step=decay)
    assert len(step.entries) == 1


def test_one_cycle_schedule_with_sgd_momentum_compiles_once():
    """OneCycleLR changes lr and momentum every step (and dampening is kept)."""
    step = _train(lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9,
                                            dampening=0.2, weight_decay=0.01),
                  schedule=lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 0.1, total_steps=8),
                  steps=5)
    assert len(step.entries) == 1


def test_step_schedule_over_two_groups_compiles_once():
    def make(model):
        groups = [{"params": [p for n, p in model.named_parameters() if n.startswith("body")],
                   "lr": 0.1},
                  {"params": [p for n, p in model.named_parameters()
                              if not n.startswith("body")], "lr": 0.03, "momentum": 0.5}]
        return torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    step = _train(make, schedule=lambda o: torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.3),
                  steps=5)
    assert len(step.entries) == 1


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_a_loss_that_is_not_floating_point_is_refused(dtype):
    model = _Net()
    step = retrograd.compile_step(model, lambda m, x: (m(x) > 0).sum().to(dtype),
                                  torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=f"floating-point loss, got dtype {dtype}"):
        step(torch.randn(6, 8))


@pytest.mark.parametrize("make", [
    lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
    lambda m: torch.optim.AdamW(m.parameters(), lr=0.01)], ids=["sgd-momentum", "adamw"])
def test_max_grad_norm_clips_as_clip_grad_norm(make):
    """clip_grad_norm_ between backward and step: the global L2 norm of the
    gradients (those that exist) scaled down to max_grad_norm."""
    compiled, _ = _pair()
    norm = torch.nn.utils.get_total_norm(
        torch.autograd.grad(_loss(compiled, torch.randn(6, 8), torch.randint(0, 3, (6,))),
                            [compiled.body.weight, compiled.body.bias, compiled.head.weight,
                             compiled.head.bias]))
    assert norm > 0.2   # the clip below is active
    _train(make, max_grad_norm=0.2)


def test_max_grad_norm_values_are_checked():
    model = _Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for bad in (0, -1.0, float("inf"), "1", True):
        with pytest.raises(ValueError, match="max_grad_norm"):
            retrograd.compile_step(model, _loss, optimizer, max_grad_norm=bad)
    with pytest.raises(ValueError, match="max_grad_norm needs an optimizer"):
        retrograd.compile_step(model, _loss, max_grad_norm=1.0)


def test_optimizer_step_hooks_are_refused():
    """compile_step never calls optimizer.step(), so a step hook would silently not run."""
    model = _Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = optimizer.register_step_post_hook(lambda *args: None)
    with pytest.raises(ValueError, match="step hooks"):
        retrograd.compile_step(model, _loss, optimizer)
    handle.remove()
    retrograd.compile_step(model, _loss, optimizer)


def test_float64_steps_match_to_double_precision():
    """Hyperparameters and the clipping norm follow float64 parameters (no
    float32 rounding on the way)."""
    compiled, eager = _pair()
    compiled.double(), eager.double()
    make = lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, amsgrad=True)  # noqa: E731
    compiled_opt, eager_opt = make(compiled), make(eager)
    step = retrograd.compile_step(compiled, _loss, compiled_opt, max_grad_norm=0.2)
    for _ in range(3):
        x, y = torch.randn(6, 8, dtype=torch.float64), torch.randint(0, 3, (6,))
        step(x, y)
        eager_opt.zero_grad()
        _loss(eager, x, y).backward()
        torch.nn.utils.clip_grad_norm_(eager.parameters(), 0.2)
        eager_opt.step()
    for p, q in zip(compiled.parameters(), eager.parameters(), strict=True):
        assert relative_error(p.detach(), q.detach()) < 1e-12
        for key, value in eager_opt.state.get(q, {}).items():
            assert relative_error(compiled_opt.state[p][key], value) < 1e-12, key


def test_adam_step_counts_are_per_parameter():
    """A parameter that got gradients at other steps keeps its own count (and
    bias corrections), as torch's per-parameter ``state["step"]``."""
    compiled, eager = _pair()
    make = lambda m: torch.optim.Adam(m.parameters(), lr=0.01, betas=(0.5, 0.7))  # noqa: E731
    compiled_opt, eager_opt = make(compiled), make(eager)
    for model, optimizer in ((compiled, compiled_opt), (eager, eager_opt)):
        for _ in range(2):   # two eager steps in which only the head has gradients
            model.head.weight.grad = torch.linspace(-1, 1, 48).reshape(3, 16)
            optimizer.step()
            optimizer.zero_grad()
    step = retrograd.compile_step(compiled, _loss, compiled_opt)
    for _ in range(3):
        x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
        step(x, y)
        eager_opt.zero_grad()
        _loss(eager, x, y).backward()
        eager_opt.step()
    _assert_match(compiled, compiled_opt, eager, eager_opt)
    assert compiled_opt.state[compiled.head.weight]["step"] == 5
    assert compiled_opt.state[compiled.body.weight]["step"] == 3
    assert len(step.entries) == 1


def test_sgd_momentum_reads_the_gradient_once():
    """The first-step choice (torch starts the buffer at the gradient) is made
    on the momentum weights, numbers: the traced update reads the gradient in
    one op, so it dies at its update instead of living beside its scaled copy."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from retrograd.optimizers import momentum_weights, update
    group = {"maximize": False, "weight_decay": 0.0, "momentum": 0.9, "nesterov": False}

    def step(p, g, buffer, momentum, one_minus_dampening, lr, fresh):
        hyper = {"momentum": momentum, "one_minus_dampening": one_minus_dampening, "lr": lr}
        keep, take = momentum_weights(hyper, fresh)
        return update("SGD", group, hyper, None, p, g, [buffer], (keep[0], take[0]))

    scalars = [torch.tensor(0.9), torch.tensor(1.0), torch.tensor(0.1), torch.tensor([True])]
    graph = make_fx(step)(torch.randn(3), torch.randn(3), torch.zeros(3), *scalars).graph
    gradient = [n for n in graph.nodes if n.op == "placeholder"][1]
    assert len(gradient.users) == 1
    p, g = torch.randn(3), torch.randn(3)
    for fresh, buffer in ((True, torch.zeros(3)), (False, torch.randn(3))):
        new_p, (new_buffer,) = step(p, g, buffer, *scalars[:3], torch.tensor([fresh]))
        expected = g if fresh else buffer * 0.9 + g
        assert torch.equal(new_buffer, expected)
        assert torch.equal(new_p, p - 0.1 * expected)
