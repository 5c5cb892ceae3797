"""Checkpoint placement (issue 4): which forward values the backward gets.

- The default plan saves no more activation bytes than torch's
  ``min_cut_rematerialization_partition`` on the same joint graph, nor than
  eager autograd (counted as ``benchmarks/memory.py`` counts them).
- ``memory_budget``: saved bytes within budget x ``save_all_bytes`` on every
  zoo model, monotonic as the budget tightens, a warning with both numbers
  and the smallest plan when no plan fits; for the exact (ILP) and the greedy
  solver alike.
- The greedy's recompute cost within 5% of the ILP's optimum on graphs the
  ILP solves (the zoo's small models, random graphs built by hand), both
  plans valid.
- ``save`` / ``recompute`` force values either way; conflicts and bad
  patterns raise.
- Gradients within fp32 tolerance of eager under every plan, dropout
  included: the backward sees the forward's mask.
- The report's memory and recompute figures and the dump after the pass.

Joint graphs come from ``retrograd.capture.joint_graph`` of each zoo model
with its loss (the benchmark's ``LossOf``), after the cleanup pass: what the
pipeline hands the checkpoint pass.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import math
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torch._functorch.partitioners import min_cut_rematerialization_partition

import retrograd
from retrograd import loss_ops
from retrograd.capture import joint_graph
from retrograd.dump import Dumper
from retrograd.options import Options
from retrograd.passes import checkpoint, cleanup
from retrograd.passes.planning import remat, remat_search
from retrograd.pipeline import OpSupport, PassContext
from zoo import ZOO, clone_inputs, errors, training_step

aten = torch.ops.aten

BUDGETS = (1.0, 0.9, 0.75, 0.5, 0.3, 0.2, 0.1)
PRODUCTS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
            aten.convolution.default}


def _benchmark():
    """benchmarks/memory.py, loaded under a name of its own."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py"
    spec = importlib.util.spec_from_file_location("retrograd_memory_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


memory_benchmark = _benchmark()


# ---------------------------------------------------------------- helpers
def context(num_fwd_outputs: int | None = None, **options) -> PassContext:
    return PassContext(Options.from_mapping(options), Dumper(None, []), OpSupport(),
                       "test_checkpoint", num_fwd_outputs=num_fwd_outputs)


@dataclass
class Captured:
    entry: object
    model: nn.Module
    inputs: tuple
    joint: fx.GraphModule
    joint_inputs: list
    count: int


@functools.lru_cache(maxsize=None)
def captured(name: str) -> Captured:
    """A zoo model's joint graph (loss included), cleaned up; built once."""
    entry = ZOO[name]
    torch.manual_seed(0)
    model, inputs = entry.model(), entry.inputs()
    joint, joint_inputs, count = joint_graph(memory_benchmark.LossOf(entry, model),
                                             clone_inputs(inputs))
    loss_ops.restore(joint, context())   # the loss ops the table holds back, as the pipeline
    cleanup.run(joint, context())
    return Captured(entry, model, inputs, joint, joint_inputs, count)


def place(subject: Captured | str, **options):
    """The checkpoint pass on a copy of the joint graph: (forward, backward),
    its stats, and the warnings retrograd gave."""
    subject = captured(subject) if isinstance(subject, str) else subject
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        halves, stats = checkpoint.run(copy.deepcopy(subject.joint),
                                       context(subject.count, **options))
    return halves, stats, [str(w.message) for w in caught if "retrograd" in str(w.message)]


def analysed(subject: Captured | str, **options):
    """The planners' view of the joint graph and the policy the pass would use."""
    subject = captured(subject) if isinstance(subject, str) else subject
    info = remat.analyse(subject.joint, subject.count, free=checkpoint._aliases_input)
    return info, checkpoint.Policy(Options.from_mapping(options), OpSupport())


def targets(subject: Captured | str) -> dict[str, object]:
    subject = captured(subject) if isinstance(subject, str) else subject
    return {node.name: node.target for node in subject.joint.graph.nodes}


def cost(plan: remat.Plan) -> float:
    return sum(remat.recompute_cost(node) for node in plan.recomputed)


def assert_valid(info: remat.JointInfo, plan: remat.Plan, recomputable,
                 unsavable=lambda node: False) -> None:
    """Every value the backward reads is saved or recomputed, and everything a
    recomputed value reads is saved, recomputed or an input."""
    available = set(info.primals) | plan.saved | plan.recomputed
    missing = sorted(node.name for node in info.needed if node not in available)
    assert not missing, f"{plan.solver}: the backward reads {missing}, neither saved nor recomputed"
    assert not plan.saved & plan.recomputed
    assert plan.saved <= set(info.forward) | set(info.primals)
    for node in plan.recomputed:
        assert node in info.forward and recomputable(node), f"{plan.solver}: {node.name}"
        absent = [arg.name for arg in info.inputs_of(node) if arg not in available]
        assert not absent, f"{plan.solver}: {node.name} is recomputed from {absent}"
    for node in plan.saved - set(info.primals):
        assert math.isfinite(remat.value_bytes(node)) and not unsavable(node), node.name


def checkpoint_stats(compiled) -> dict:
    [record] = [p for p in compiled.reports["backward"]["passes"] if p["name"] == "checkpoint"]
    return record["stats"]


def weighted_sum(output: torch.Tensor) -> torch.Tensor:
    """The zoo's loss: squares with positive weights, no cancellation."""
    weights = torch.linspace(0.5, 1.5, output.numel(), dtype=output.dtype).view(output.shape)
    return (output.square() * weights).sum()


def assert_gradients_close(got: dict, expected: dict, tolerance: float = 1e-5) -> None:
    """Relative error below ``tolerance`` for the loss and every gradient; a
    gradient that is zero in exact arithmetic (a bias right before a
    BatchNorm) is rounding noise on both sides, so one far below the largest
    gradient is compared absolutely, against that largest gradient."""
    largest = max(value.double().norm().item() for name, value in expected.items()
                  if name.startswith("grad") and value is not None)
    bad = {}
    for name, error in errors(got, expected).items():
        reference, value = expected[name], got[name]
        if error < tolerance:
            continue
        if (reference is not None and value is not None and name.startswith("grad")
                and reference.double().norm().item() <= tolerance * largest
                and (value.double() - reference.double()).norm().item() <= tolerance * largest):
            continue
        bad[name] = error
    assert not bad, f"relative error >= {tolerance:g}: {bad}"


@pytest.fixture
def greedy(monkeypatch):
    """Budgets solved by the greedy, as on graphs too large for the ILP."""
    monkeypatch.setattr(checkpoint, "EXACT_LIMIT", 0)


SOLVERS = ["ilp", "greedy"]


@pytest.fixture
def solver(request, monkeypatch):
    if request.param == "greedy":
        monkeypatch.setattr(checkpoint, "EXACT_LIMIT", 0)
    return request.param


# ============================================ 1. the default plan against torch and eager
@pytest.mark.parametrize("name", list(ZOO))
def test_default_plan_saves_no_more_than_torch_min_cut_and_eager(name):
    subject = captured(name)
    eager = memory_benchmark.eager_saved_bytes(subject.entry, copy.deepcopy(subject.model),
                                               clone_inputs(subject.inputs))
    forward, backward = min_cut_rematerialization_partition(
        copy.deepcopy(subject.joint), subject.joint_inputs, num_fwd_outputs=subject.count)
    _, activations = checkpoint.saved_values(forward, backward)
    torch_min_cut = checkpoint._bytes(activations)
    _, stats, caught = place(name)
    ours = stats["saved_activation_bytes"]
    assert stats["plan"].startswith("least saved bytes") and stats["budget_bytes"] is None
    assert not caught
    assert eager > 0 and torch_min_cut > 0
    assert ours <= torch_min_cut, \
        f"{name}: retrograd saves {ours} bytes, torch's min-cut {torch_min_cut}"
    assert ours <= eager, f"{name}: retrograd saves {ours} bytes, eager autograd {eager}"


def test_figures_are_those_of_the_memory_benchmark():
    """The helpers above count as benchmarks/memory.py's ``measure`` does."""
    row = memory_benchmark.measure("mlp")
    subject = captured("mlp")
    forward, backward = min_cut_rematerialization_partition(
        copy.deepcopy(subject.joint), subject.joint_inputs, num_fwd_outputs=subject.count)
    assert row["torch min-cut"] == checkpoint._bytes(checkpoint.saved_values(forward, backward)[1])
    assert row["eager"] == memory_benchmark.eager_saved_bytes(
        subject.entry, copy.deepcopy(subject.model), clone_inputs(subject.inputs))
    assert row["retrograd"] == place("mlp")[1]["saved_activation_bytes"]
    assert row["retrograd 0.5"] == place("mlp", memory_budget=0.5)[1]["saved_activation_bytes"]


# ============================================ 2. memory budgets
def sweep(name: str) -> list[tuple[float, int, float]]:
    """(budget, saved bytes, recompute cost) per budget, each within its budget."""
    rows, save_all = [], None
    for fraction in BUDGETS:
        _, stats, caught = place(name, memory_budget=fraction)
        assert not caught, caught
        save_all = stats["save_all_bytes"] if save_all is None else save_all
        assert stats["save_all_bytes"] == save_all > 0
        assert stats["budget_bytes"] == int(fraction * save_all)
        assert stats["plan"] == f"memory_budget={fraction}"
        saved = stats["saved_activation_bytes"]
        assert isinstance(saved, int) and saved <= fraction * save_all, \
            f"{name}: memory_budget={fraction} allows {fraction * save_all} bytes, {saved} saved"
        assert stats["recomputed_nodes"] == len(stats["recomputed"])
        # a plan the guard chose at some level of its walk stays down to where it fits
        solver = stats["solver"] if not stats["peak_guard"]["rejected"] else "guard"
        rows.append((fraction, saved, stats["recompute_cost"], solver, stats["optimal"]))
    for (looser, saved, spent, *_), (tighter, saved_now, spent_now, *_) in zip(rows, rows[1:]):
        assert saved_now <= saved, f"{name}: {tighter} saves {saved_now} bytes, {looser} {saved}"
        assert spent_now >= spent, f"{name}: {tighter} recomputes {spent_now}, {looser} {spent}"
    assert rows[0][2] == 0.0, "with the whole budget nothing needs recomputing"
    assert rows[-1][1] < rows[0][1] and rows[-1][2] > 0, "the sweep never bit"
    return rows


@pytest.mark.parametrize("name", list(ZOO))
def test_budget_sweep_exact(name):
    rows = sweep(name)   # the ILP's plan, unless the peak guard rejected it (test_budget_guard)
    assert all(solver == "guard" or solver.startswith("ilp") and optimal
               for *_, solver, optimal in rows)


@pytest.mark.parametrize("name", ["mlp", "cnn", "attention_block", "mlp_frozen"])
def test_budget_sweep_greedy(name, greedy):
    rows = sweep(name)
    assert all(solver.startswith("greedy") and not optimal for *_, solver, optimal in rows)


class DropoutMLP(nn.Module):
    """Linear -> Dropout -> Linear; returns the output and the dropped hidden
    layer, whose zeros show the mask the forward drew."""

    def __init__(self, features: int = 8, hidden: int = 64, classes: int = 4, p: float = 0.3):
        super().__init__()
        self.p = p
        self.up = nn.Linear(features, hidden)
        self.drop = nn.Dropout(p)
        self.down = nn.Linear(hidden, classes)

    def forward(self, x):
        hidden = self.drop(self.up(x))
        return self.down(hidden), hidden


class WithLoss(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return (weighted_sum(self.model(x)[0]),)


@functools.lru_cache(maxsize=None)
def dropout_joint() -> Captured:
    torch.manual_seed(0)
    model, x = DropoutMLP(), torch.randn(16, 8, requires_grad=True)
    joint, joint_inputs, count = joint_graph(WithLoss(model), [x])
    cleanup.run(joint, context())
    return Captured(None, model, (x,), joint, joint_inputs, count)


def is_random(target) -> bool:
    return torch.Tag.nondeterministic_seeded in getattr(target, "tags", ())


@pytest.mark.parametrize("solver", SOLVERS, indirect=True)
@pytest.mark.parametrize("budget", [1, 4])
def test_infeasible_budget_warns_with_both_numbers_and_gives_the_smallest_plan(budget, solver):
    """The dropout's seed must be saved (seed draws are never recomputed; the
    mask is, from the seed), so no plan saves less than its 8 bytes."""
    subject = dropout_joint()
    save_all = place(subject, memory_budget=1.0)[1]["save_all_bytes"]
    fraction = budget / save_all
    with pytest.warns(UserWarning, match=rf"memory_budget={fraction} asks for at most") as record:
        _, stats = checkpoint.run(copy.deepcopy(subject.joint),
                                  context(subject.count, memory_budget=fraction))
    [message] = [str(w.message) for w in record if "retrograd" in str(w.message)]
    asked, smallest = map(int, re.search(r"at most (\d+) saved bytes, but the smallest plan "
                                         r"saves (\d+) bytes", message).groups())
    assert asked == round(budget)
    assert smallest == stats["saved_activation_bytes"] == 8 > budget
    assert stats["saved"] == ["randint"]
    # the smallest indeed: the exact solver finds no plan with a byte less
    info, policy = analysed(subject)
    assert remat.ilp_plan(info, smallest - 1, policy.any, policy.forced_recompute) is None
    assert remat.ilp_plan(info, smallest, policy.any, policy.forced_recompute) is not None
    names = targets(subject)
    assert not [n for n in stats["recomputed"] if is_random(names[n])]


# ============================================ 3. the greedy against the exact solver
def check_greedy_against_ilp(info, recomputable, unsavable=lambda node: False,
                             budgets=BUDGETS[1:], tolerance=0.05) -> int:
    """Greedy and ILP plans at each budget: both valid and within budget, the
    greedy's cost within ``tolerance`` of the optimum, the greedy's plans
    monotonic as the budget tightens. Returns how many budgets were feasible."""
    save_all = remat.plan_bytes(info, remat.save_all_plan(info).saved)
    previous, feasible = None, 0
    for fraction in budgets:
        budget = fraction * save_all
        exact = remat.ilp_plan(info, budget, recomputable, unsavable)
        greedy = remat_search.greedy_plan(info, budget, recomputable, unsavable)
        assert_valid(info, greedy, recomputable, unsavable)
        greedy_bytes = remat.plan_bytes(info, greedy.saved)
        if previous is not None:
            assert greedy_bytes <= previous[0] and cost(greedy) >= previous[1], fraction
        previous = greedy_bytes, cost(greedy)
        if exact is None:       # no plan fits, so the greedy's cannot either
            assert greedy_bytes > budget
            continue
        feasible += 1
        assert exact.optimal
        assert_valid(info, exact, recomputable, unsavable)
        assert remat.plan_bytes(info, exact.saved) <= budget
        assert greedy_bytes <= budget, f"greedy saves {greedy_bytes} bytes of {budget} allowed"
        assert cost(greedy) <= (1 + tolerance) * cost(exact) + 1e-9, \
            f"budget {fraction}: greedy recompute cost {cost(greedy)}, optimum {cost(exact)}"
    return feasible


@pytest.mark.parametrize("name", ["mlp", "cnn", "attention_block"])
def test_greedy_within_5_percent_of_the_optimum_on_the_zoo(name):
    info, policy = analysed(name)
    assert len(info.forward) <= checkpoint.EXACT_LIMIT
    assert check_greedy_against_ilp(info, policy.any, policy.forced_recompute) == len(BUDGETS) - 1
    optimum = remat.ilp_plan(info, 0.1 * remat.plan_bytes(info, remat.save_all_plan(info).saved),
                             policy.any, policy.forced_recompute)
    assert cost(optimum) > 0


def test_greedy_within_5_percent_with_forced_values():
    """The same with ``save`` (matrix products) and ``recompute`` (GELU's
    output) narrowing both solvers' choices."""
    info, policy = analysed("mlp", save=["addmm"], recompute=["mul_2"])
    check_greedy_against_ilp(info, policy.any, policy.forced_recompute)


def random_graph(seed: int, size: int):
    """A random forward graph by hand: ``size`` values of varied sizes from
    pointwise ops, matrix products, reductions and random draws (never
    recomputable), each reading recent values; a quarter of them read by the
    backward. Returns (JointInfo, recomputable)."""
    rng = random.Random(seed)
    graph = fx.Graph()
    primals = []
    for index in range(3):
        node = graph.placeholder(f"primals_{index + 1}")
        node.meta["val"] = torch.empty(rng.choice([4, 8, 16]), 8, device="meta")
        primals.append(node)
    nodes, draws = [], set()
    ops = {"exp": aten.exp.default, "add": aten.add.Tensor, "mm": aten.mm.default,
           "sum": aten.sum.dim_IntList, "rand": aten.rand_like.default}
    for _ in range(size):
        pool = primals + nodes
        kind = rng.choices(list(ops), [4, 4, 2, 1, 0.5])[0]
        if kind in ("exp", "sum", "rand"):
            args = (rng.choice(pool[-8:]),)
        else:
            args = tuple(rng.sample(pool[-10:], 2))
        node = graph.call_function(ops[kind], args)
        rows = 1 if kind == "sum" else rng.choice([1, 2, 4, 8, 16, 32])
        node.meta["val"] = torch.empty(rows, 8, device="meta")
        if kind == "rand":
            draws.add(node)
        nodes.append(node)
    needed = set(rng.sample(nodes, max(3, size // 4))) | {nodes[-1]}
    return remat.JointInfo(nodes, primals, needed), lambda node: node not in draws


@pytest.mark.parametrize("seed", range(16))
def test_greedy_within_5_percent_of_the_optimum_on_random_graphs(seed):
    info, recomputable = random_graph(seed, 20 + seed % 4 * 10)
    assert check_greedy_against_ilp(info, recomputable) >= 3


def test_greedy_on_thousands_of_values_is_fast_valid_and_within_budget():
    import time
    info, recomputable = random_graph(7, 3000)
    save_all = remat.plan_bytes(info, remat.save_all_plan(info).saved)
    start = time.perf_counter()
    plan = remat_search.greedy_plan(info, 0.5 * save_all, recomputable)
    seconds = time.perf_counter() - start
    assert_valid(info, plan, recomputable)
    assert remat.plan_bytes(info, plan.saved) <= 0.5 * save_all
    assert seconds < 60, f"greedy took {seconds:.1f}s on 3000 values"


# ============================================ 4. save / recompute
@pytest.mark.parametrize("solver", SOLVERS, indirect=True)
@pytest.mark.parametrize("name, patterns", [
    ("mlp", ["addmm"]),
    ("attention_block", ["aten.addmm", "bmm"]),
    ("gpt2_tiny", ["addmm", "aten.mm.default", "aten.bmm"]),
])
def test_saved_matrix_products_are_never_recomputed(name, patterns, solver):
    names = targets(name)
    products = {n for n, target in names.items() if target in PRODUCTS}
    _, free_stats, _ = place(name, memory_budget=0.1)
    assert products & set(free_stats["recomputed"]), "the budget alone recomputes products"
    _, stats, caught = place(name, memory_budget=0.1, save=patterns)
    assert not products & set(stats["recomputed"]), stats["recomputed"]
    if stats["saved_activation_bytes"] > stats["budget_bytes"]:
        assert any("smallest plan saves" in message for message in caught), \
            "over budget without a warning"


@pytest.mark.parametrize("budget, solver", [(None, "ilp"), (1.0, "ilp"), (1.0, "greedy"),
                                            (0.5, "ilp"), (0.5, "greedy")],
                         indirect=["solver"])
@pytest.mark.parametrize("pattern", ["erf", "mul_2", "aten.mul", "aten.mul.Tensor"])
def test_recomputed_values_are_never_saved(pattern, budget, solver):
    """In the MLP, erf and mul_2 (GELU's output) and the multiplications."""
    subject = captured("mlp")
    forced = {node.name for node in subject.joint.graph.nodes if node.op == "call_function"
              and pattern in checkpoint.Policy._names(node)}
    assert forced
    _, baseline, _ = place(subject, memory_budget=budget)
    _, stats, caught = place(subject, memory_budget=budget, recompute=[pattern])
    assert not caught
    assert not forced & set(stats["saved"]), stats["saved"]
    # what the backward read saved before, it now recomputes
    assert forced & set(baseline["saved"]) <= set(stats["recomputed"])
    if budget is not None:
        assert stats["saved_activation_bytes"] <= budget * stats["save_all_bytes"]


def test_recompute_does_not_reach_random_draws():
    """A random draw named in ``recompute`` is still not recomputed."""
    subject = dropout_joint()
    names = targets(subject)
    draws = [n for n, target in names.items() if is_random(target)]
    assert draws
    for budget in (None, 0.5):
        _, stats, _ = place(subject, memory_budget=budget, recompute=draws)
        assert not set(draws) & set(stats["recomputed"])


def test_forced_values_matter():
    """The MLP's default plan saves a matrix product and GELU's output is
    saved with the whole budget, so the tests above are not vacuous."""
    names = targets("mlp")
    assert any(names[n] in PRODUCTS for n in place("mlp")[1]["saved"])
    assert "mul_2" in place("mlp", memory_budget=1.0)[1]["saved"]


@pytest.mark.parametrize("save, recompute", [
    (["mm"], ["mm"]), ("erf", ["erf"]), (["aten.mm"], ["mm"]),
    (["aten.addmm.default"], ["addmm"]), (["mul_2", "aten.mm.default"], ["aten.mm"]),
])
def test_conflicting_save_and_recompute_raise(save, recompute):
    with pytest.raises(ValueError, match="both save and recompute"):
        Options.from_mapping({"save": save, "recompute": recompute})
    with pytest.raises(ValueError, match="both save and recompute"):
        retrograd.compile(nn.Linear(2, 2), save=save, recompute=recompute)


@pytest.mark.parametrize("option", ["save", "recompute"])
@pytest.mark.parametrize("value", [3, None, 1.5, [3], ["mm", None], [""], [b"mm"],
                                   [re.compile("mm")], [["mm"]], {"mm": True}], ids=repr)
def test_bad_patterns_raise(option, value):
    with pytest.raises(ValueError, match=rf"option {option}=") as error:
        Options.from_mapping({option: value})
    assert repr(value) in str(error.value)
    with pytest.raises(ValueError, match=rf"option {option}="):
        retrograd.compile(nn.Linear(2, 2), **{option: value})


@pytest.mark.parametrize("patterns", ["addmm", ["addmm", "erf"], ("mm",), {"mm"}])
def test_good_patterns(patterns):
    options = Options.from_mapping({"save": patterns})
    expected = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    assert options.save == expected and options.recompute == ()


# ============================================ 5. gradients under every plan
@pytest.mark.parametrize("budget", [None, 0.5, 0.1])
@pytest.mark.parametrize("name", ["mlp", "cnn", "attention_block", "gpt2_tiny"])
def test_gradients_match_eager_under_every_plan(name, budget, no_dump_env):
    entry = ZOO[name]
    torch.manual_seed(0)
    model, inputs = entry.model(), entry.inputs()
    reference = copy.deepcopy(model)
    expected = training_step(entry, reference, reference, inputs)
    compiled = retrograd.compile(model, memory_budget=budget)
    got = training_step(entry, compiled, model, inputs)
    assert_gradients_close(got, expected)
    stats = checkpoint_stats(compiled)
    if budget is None:
        assert stats["plan"].startswith("least saved bytes")
    else:
        assert stats["plan"] == f"memory_budget={budget}"
        assert stats["saved_activation_bytes"] <= budget * stats["save_all_bytes"]
    if budget == 0.1:
        assert stats["recomputed_nodes"] > 0


@pytest.mark.parametrize("budget", [None, 0.5, 0.1])
def test_dropout_backward_sees_the_forward_mask(budget, no_dump_env):
    """The compiled forward draws its own mask (a Philox stream, not torch's);
    the mask is recovered from the dropped hidden layer it returns, eager
    replays it, and every gradient must match: a backward that drew a new seed
    would not (recomputing the draw from the saved seed gives the same mask)."""
    torch.manual_seed(0)
    model = DropoutMLP()
    reference = copy.deepcopy(model)
    x = torch.randn(16, 8, requires_grad=True)
    compiled = retrograd.compile(model, memory_budget=budget)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "retrograd: memory_budget")   # the seed must stay
        out, hidden = compiled(x)
    weighted_sum(out).backward()

    kept = hidden.detach() != 0
    scale = 1 / (1 - model.p)
    with torch.no_grad():
        pre = model.up(x)
    assert 0.5 < kept.float().mean().item() < 0.9, "a mask near 70% kept"
    torch.testing.assert_close(hidden.detach()[kept], pre[kept] * scale)
    x_reference = x.detach().clone().requires_grad_()
    hidden_reference = reference.up(x_reference) * kept * scale
    out_reference = reference.down(hidden_reference)
    weighted_sum(out_reference).backward()
    torch.testing.assert_close(out.detach(), out_reference.detach())
    got = {"grad input": x.grad, **{f"grad {n}": p.grad for n, p in model.named_parameters()}}
    expected = {"grad input": x_reference.grad,
                **{f"grad {n}": p.grad for n, p in reference.named_parameters()}}
    assert_gradients_close(got, expected)

    stats = checkpoint_stats(compiled)
    if budget is not None:
        assert stats["recomputed_nodes"] > 0, "nothing recomputed next to the mask"


@pytest.mark.parametrize("solver", SOLVERS, indirect=True)
@pytest.mark.parametrize("budget", [None, 0.5, 0.1, 0.001])
def test_random_draws_are_never_recomputed(budget, solver):
    subject = dropout_joint()
    names = targets(subject)
    (_, backward), stats, _ = place(subject, memory_budget=budget)
    assert not [n.name for n in backward.graph.nodes if is_random(n.target)]
    assert not [n for n in stats["recomputed"] if is_random(names[n])]


# ============================================ 6. the report and the dump
def test_report_and_dump_show_the_plan(tmp_path, no_dump_env):
    entry = ZOO["mlp"]
    torch.manual_seed(0)
    model, inputs = entry.model(), entry.inputs()
    compiled = retrograd.compile(model, memory_budget=0.5, dump_dir=str(tmp_path))
    training_step(entry, compiled, model, inputs)
    stats = checkpoint_stats(compiled)
    assert all(isinstance(n, str) for n in stats["saved"] + stats["recomputed"])
    assert stats["saved"] and stats["recomputed"]
    for half in ("forward", "backward"):
        report = compiled.reports[half]
        memory, recompute = report["memory"]["saved_activation_bytes"], report["recompute"]
        assert type(memory) is int and type(recompute["nodes"]) is int \
            and type(recompute["flops"]) is int
        assert memory == stats["saved_activation_bytes"] > 0
        assert recompute["nodes"] == len(stats["recomputed"]) == stats["recomputed_nodes"]
        assert recompute["flops"] == stats["recomputed_flops"] > 0

    [folder] = tmp_path.glob("*-backward")
    [dumped] = folder.glob("*_checkpoint.py")
    text = dumped.read_text()
    assert "# ---- backward ----" in text
    backward = text.split("# ---- backward ----", 1)[1]
    signature = re.search(r"def forward\(self, (.*?)\):", backward, re.S).group(1)
    parameters = set(re.findall(r"(\w+):", signature))
    for name in stats["recomputed"]:
        assert re.search(rf"^\s+{name}(: [^=]*)? = ", backward, re.M), \
            f"{name} is not computed in the dumped backward"
        assert name not in parameters
    assert set(stats["saved"]) <= parameters
    report = (folder / "report.json").read_text()
    assert f'"saved_activation_bytes": {stats["saved_activation_bytes"]}' in report
