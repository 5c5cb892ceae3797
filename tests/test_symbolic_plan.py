"""A symbolic program's memory plan sized at run time (compiler/symbolic_plan.py):
arenas sized per call from the sizes, plans cached per size, the measured
peak never above the torch-call program's, values against eager on sizes
never traced."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import retrograd
import torch
from checks import assert_close
from retrograd.symbolic_plan import out_overload
from retrograd.symbolic_runner import ArenaRunner
from test_dynamic_shapes import Attention
from test_symbolic_passes import _symbolic_compiler
from torch.fx.experimental.proxy_tensor import make_fx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from measuring import profiled_peak

aten = torch.ops.aten


pytestmark = pytest.mark.usefixtures("cache")


def products(x):
    """A matrix product, then pointwise ops each over its dying input."""
    return (x.mm(x.t()).sin().exp() * 2).sum()


def _symbolic_graph(fn, example):
    gm = make_fx(fn, tracing_mode="symbolic")(example)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def test_out_overloads_match_the_functional_arguments():
    assert out_overload(aten.add.Tensor) is aten.add.out
    assert out_overload(aten.pow.Tensor_Scalar) is aten.pow.Tensor_Scalar_out
    assert out_overload(aten.sum.dim_IntList) is aten.sum.IntList_out
    assert out_overload(aten.view.default) is None
    assert out_overload(aten.native_layer_norm.default) is None   # three results


def test_a_pointwise_chain_over_dying_inputs_takes_one_slot_at_every_size():
    gm = _symbolic_graph(products, torch.randn(4, 3))
    runner = ArenaRunner(gm)
    for rows in (5, 9, 2):
        x = torch.randn(rows, 3)
        assert_close(runner([x]), products(x), torch.float32)
        plan = runner.last_plan
        # mm, sin over it, exp over sin, mul over exp: one slot of rows x rows floats
        assert plan.arena_bytes == rows * rows * 4, plan
        assert len({place for place in plan.offsets.values()}) == 1, plan.offsets
        assert plan.predicted_peak < plan.predicted_peak_without
    assert len(runner.planner.plans) == 3
    x = torch.randn(5, 3)
    first = runner.planner.plan(runner.planner.symbols([x]))
    runner([x])
    assert runner.last_plan is first   # cached per size: planned once


def test_the_chain_measures_a_lower_peak_than_the_torch_calls():
    gm = _symbolic_graph(products, torch.randn(4, 3))
    runner = ArenaRunner(gm)
    for rows in (64, 97):
        x = torch.randn(rows, 3)
        arena = profiled_peak(lambda x=x: runner([x]))
        plain = profiled_peak(lambda x=x: gm(x))
        # plain holds mm and sin at once; the arena one slot
        assert arena <= plain - rows * rows * 4 + 64, (arena, plain)


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(),
                               torch.nn.Linear(64, 16), torch.nn.Tanh()).double()


@pytest.mark.parametrize("which", ["mlp", "attention"])
def test_measured_peak_never_above_the_torch_call_program(which):
    model = _mlp() if which == "mlp" else Attention().double()
    reference = copy.deepcopy(model)
    if which == "mlp":
        loss = lambda m: (lambda x: m(x).square().mean())
        make = lambda n: torch.randn(n, 16, dtype=torch.float64)
    else:
        loss = lambda m: m
        make = lambda n: torch.randn(2, n, 8, dtype=torch.float64)
    compiled = {e: retrograd.compile(loss(model), executor=e) for e in ("torch", "fx")}
    for fn in compiled.values():
        for size in (3, 4):
            fn(make(size).requires_grad_()).backward()
    runners = _symbolic_compiler(compiled["torch"]).runners
    assert _symbolic_compiler(compiled["fx"]).runners == {"forward": None, "backward": None}
    for size in (37, 101):   # never traced, odd
        x = make(size).requires_grad_()
        peaks = {e: profiled_peak(lambda fn=fn, x=x: fn(x).backward())
                 for e, fn in compiled.items()}
        assert peaks["torch"] <= peaks["fx"], peaks
        assert runners["forward"].last_plan.arena_bytes, runners["forward"].last_plan
        model.zero_grad()
        reference.zero_grad()
        x.grad = None
        compiled["torch"](x).backward()
        reference_x = x.detach().clone().requires_grad_()
        loss(reference)(reference_x).backward()
        assert_close(x.grad, reference_x.grad, torch.float64, what="input gradient")
        for (name, a), b in zip(model.named_parameters(), reference.parameters()):
            assert_close(a.grad, b.grad, torch.float64, what=name)


def split_then_read(x):
    """A split's items share the storage of ``x * 2``: the exp of one item must
    not be written there while the other item is still to be read."""
    first, second = (x * 2).split(2, dim=1)
    return (first.exp() * second).sum()


def test_a_value_lives_as_long_as_the_items_of_its_split():
    gm = _symbolic_graph(split_then_read, torch.randn(6, 4))   # 6 != 4: two symbols
    runner = ArenaRunner(gm)
    for rows in (5, 3):
        x = torch.randn(rows, 4)
        assert_close(runner([x]), split_then_read(x), torch.float32)
        plan = runner.last_plan
        assert "mul" in plan.offsets, plan   # planned: the check is not vacuous
    values = runner.planner.values   # x * 2 lives until the second item's last reader
    assert values["mul"].end == values["mul_1"].start


def test_zoo_attention_block_at_untraced_batch_sizes_under_the_cpu_default():
    """The torch program (arenas, out=) on a block whose qkv projection is
    split: parameter and input gradients against eager (was: inf)."""
    from zoo import ZOO, assert_parity, training_step
    entry = ZOO["attention_block"]
    torch.manual_seed(0)
    model = entry.model()
    reference = copy.deepcopy(model)
    compiled = retrograd.compile(model, executor="torch")
    (base,) = entry.inputs()
    for batch in (2, 3, 5):
        inputs = (torch.cat([base] * 3)[:batch].detach().requires_grad_(),)
        model.zero_grad()
        reference.zero_grad()
        assert_parity(training_step(entry, compiled, model, inputs),
                      training_step(entry, reference, reference, inputs))
    assert _symbolic_compiler(compiled).runners["forward"].last_plan.arena_bytes


def sandwich(x, w):
    """Pointwise ops between two matrix products: one size-generic kernel when fused."""
    return (x.mm(w).sin().exp() * 2).mm(w.t()).sum()


def _sandwich_runners():
    from retrograd.symbolic_fusion import fuse_pointwise

    def graph():
        gm = make_fx(sandwich, tracing_mode="symbolic")(torch.randn(4, 6), torch.randn(6, 32))
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return gm
    fused, kernels = fuse_pointwise(graph(), "interpret")
    assert kernels == 1
    return ArenaRunner(fused), ArenaRunner(graph()), torch.randn(6, 32)


def test_kernel_results_take_arena_slots_over_their_dying_input():
    """The kernel's output is planned (before: allocated outside the arena) and
    written over the product it reads, as the unfused chain of torch calls is."""
    fused, plain, weight = _sandwich_runners()
    (item,) = [v for v in fused.planner.values.values() if v.node.startswith("getitem")]
    assert item.over == "mm"
    for rows in (64, 97):   # never traced
        x = torch.randn(rows, 6)
        assert_close(fused([x, weight]), sandwich(x, weight), torch.float32)
        assert_close(plain([x, weight]), sandwich(x, weight), torch.float32)
        assert len(set(fused.last_plan.offsets.values())) == 2   # mm (and the kernel's), mm_1
        assert fused.last_plan.arena_bytes == plain.last_plan.arena_bytes
        peaks = [profiled_peak(lambda r=r, x=x: r([x, weight])) for r in (fused, plain)]
        assert peaks[0] <= peaks[1], peaks


class _Wave(torch.nn.Module):
    """Elementwise both ways: sin * 2, and its backward cos * 2 * grad."""

    def forward(self, x):
        return x.sin() * 2


def _sandwich_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 32, bias=False), _Wave(),
                               torch.nn.Linear(32, 32, bias=False), _Wave(),
                               torch.nn.Linear(32, 4, bias=False))


def test_a_dynamic_compile_with_fused_kernels_peaks_no_higher_than_without():
    """The interpreter's program (size-generic kernels in the arena) against the
    torch program (the same graph as torch calls in the arena), at untraced sizes."""
    models = {e: _sandwich_model() for e in ("interpret", "torch")}
    compiled = {e: retrograd.compile(m, executor=e) for e, m in models.items()}
    for rows in (3, 4):
        x = torch.randn(rows, 6)
        for fn in compiled.values():
            fn(x).square().sum().backward()
    backward = _symbolic_compiler(compiled["interpret"]).runners["backward"]
    assert compiled["interpret"].reports["backward"]["kernels"]["triton"] >= 2
    for rows in (67, 130):
        x = torch.randn(rows, 6)
        peaks = {e: profiled_peak(lambda fn=fn, x=x: fn(x).square().sum().backward())
                 for e, fn in compiled.items()}
        assert peaks["interpret"] <= peaks["torch"], peaks
        planned = [n for n in backward.last_plan.offsets if n.startswith("getitem")]
        assert planned, backward.last_plan.offsets
    for a, b in zip(models["interpret"].parameters(), models["torch"].parameters()):
        assert_close(a.grad, b.grad, torch.float32, what="gradient")


def centred(x, w):
    """A per-row mean (a sized reduction) read by a matrix product (a broadcast
    subtraction would fuse with it into one kernel: symbolic_fusion)."""
    return x.mean(-1, keepdim=True).mm(w).sum()


def test_a_sized_reduction_result_takes_an_arena_slot():
    from retrograd.symbolic_fusion import fuse_pointwise
    gm = make_fx(centred, tracing_mode="symbolic")(torch.randn(4, 6), torch.randn(1, 3))
    gm, kernels = fuse_pointwise(gm, "interpret")
    assert kernels == 1
    runner = ArenaRunner(gm)
    (reduction,) = [n for n in gm.graph.nodes if n.name.startswith("sized_reduction")]
    assert reduction.name in runner.planner.values
    weight = torch.randn(1, 3)
    for rows in (5, 33):
        x = torch.randn(rows, 6)
        assert_close(runner([x, weight]), centred(x, weight), torch.float32)
        assert reduction.name in runner.last_plan.offsets, runner.last_plan
