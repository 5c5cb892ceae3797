"""Symbolic programs get retrograd's passes (issue 14 item 4): the checkpoint
plan made at the size hints (compiler/symbolic_partition.py); every check
runs on sizes the program was not traced at, odd ones too, against eager."""

from __future__ import annotations

import copy

import pytest
import retrograd
import sympy
import torch
from checks import assert_close
from retrograd import symbolic_partition
from test_dynamic_shapes import Attention

pytestmark = pytest.mark.usefixtures("cache")


def chain(x):
    """Cheap pointwise ops whose eager backward reads two activations; the
    min-cut plan keeps only x (an input) and recomputes them."""
    return (x.sin() * 2).exp().tanh().sum()


def measured_saved_bytes(fn, *inputs, keep=()) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of one
    call, the inputs and ``keep`` (parameters ``fn`` closes over) left out."""
    owned = {t.untyped_storage().data_ptr() for t in (*inputs, *keep)}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned and storage.nbytes():
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(*inputs).backward()
    return sum(saved.values())


def _symbolic_compiler(compiled):
    found = [entry.compiler for kept in compiled._cache.entries.values() for entry in kept
             if entry.shapes is not None]
    assert len(found) == 1, found
    return found[0]


def _check_gradients(compiled, reference_fn, x) -> None:
    x = x.detach().clone().requires_grad_()
    reference = x.detach().clone().requires_grad_()
    got, expected = compiled(x), reference_fn(reference)
    got.backward()
    expected.backward()
    assert_close(got, expected, torch.float64)
    assert_close(x.grad, reference.grad, torch.float64, what="gradient")


def _compile_two_sizes(fn, make, sizes=(2, 3), **options):
    compiled = retrograd.compile(fn, **options)
    for size in sizes:
        _check_gradients(compiled, fn, make(size))
    return compiled


def test_symbolic_joint_graph_is_split_by_the_min_cut_plan_at_the_hints(monkeypatch):
    make = lambda rows: torch.randn(rows, 5, dtype=torch.float64)
    ours = _compile_two_sizes(chain, make)
    checkpoint = _symbolic_compiler(ours).checkpoint
    assert checkpoint is not None and checkpoint["solver"].startswith("min-cut")
    assert checkpoint["saved"] == [] and checkpoint["recomputed_nodes"] >= 3
    monkeypatch.setattr(symbolic_partition, "partition", lambda *args: None)
    default = _compile_two_sizes(chain, make)
    assert _symbolic_compiler(default).checkpoint is None
    for rows in (7, 13):   # never traced
        for compiled in (ours, default):
            _check_gradients(compiled, chain, make(rows))
        mine = measured_saved_bytes(ours, make(rows).requires_grad_())
        theirs = measured_saved_bytes(default, make(rows).requires_grad_())
        assert mine == 0 and theirs == 2 * rows * 5 * 8, (mine, theirs)   # exp, tanh
    assert ours._cache.compiles == 2 and default._cache.compiles == 2


def test_attention_saves_no_more_than_the_default_partition_at_untraced_lengths(monkeypatch):
    torch.manual_seed(0)
    model = Attention().double()
    reference = copy.deepcopy(model)
    make = lambda length: torch.randn(2, length, 8, dtype=torch.float64)
    compiled = {"ours": retrograd.compile(model)}
    with monkeypatch.context() as patch:
        patch.setattr(symbolic_partition, "partition", lambda *args: None)
        compiled["default"] = retrograd.compile(model)
        for length in (3, 4):
            compiled["default"](make(length))
    for length in (3, 4):
        compiled["ours"](make(length))
    expression = sympy.sympify(
        _symbolic_compiler(compiled["ours"]).checkpoint["saved_activation_bytes_expression"])
    assert len(expression.free_symbols) == 1
    for length in (9, 6):   # never traced, one odd
        x = make(length)
        saved = {face: measured_saved_bytes(fn, x, keep=list(model.parameters()))
                 for face, fn in compiled.items()}
        assert saved["ours"] <= saved["default"], saved
        (symbol,) = expression.free_symbols
        assert saved["ours"] == int(expression.subs(symbol, length)), (saved, expression)
        for face, fn in compiled.items():
            model.zero_grad()
            reference.zero_grad()
            fn(x).backward()
            reference(x).backward()
            for (name, a), b in zip(model.named_parameters(), reference.parameters()):
                assert_close(a.grad, b.grad, torch.float64, what=f"{face}: {name}")
    assert compiled["ours"]._cache.compiles == 2


def test_symbolic_report_carries_the_plan_and_its_bytes_as_an_expression():
    compiled = _compile_two_sizes(chain, lambda rows: torch.randn(rows, 5, dtype=torch.float64))
    symbolic = compiled.reports["forward"]["symbolic"]
    assert symbolic["checkpoint"]["solver"].startswith("min-cut")
    assert symbolic["saved_activation_bytes"] == "0"
    assert "ledger" not in symbolic["checkpoint"]


def test_memory_budget_applies_to_the_symbolic_program():
    """A tiny memory_budget recomputes even the matrix product: odd sizes
    still match eager, and nothing but inputs and parameters is saved."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 6).double()

    def loss(x):
        return linear(x).tanh().square().sum()
    make = lambda rows: torch.randn(rows, 4, dtype=torch.float64)
    compiled = _compile_two_sizes(loss, make, memory_budget=0.01)
    checkpoint = _symbolic_compiler(compiled).checkpoint
    assert checkpoint["plan"] == "memory_budget=0.01"
    assert checkpoint["saved"] == [], checkpoint["saved"]
    for rows in (5, 11):
        _check_gradients(compiled, loss, make(rows))
        assert measured_saved_bytes(compiled, make(rows).requires_grad_(),
                                    keep=list(linear.parameters())) == 0


def test_a_failing_plan_leaves_the_default_partition_not_a_static_family(monkeypatch, caplog):
    """The plan raising on the symbolic graph (it did: an unbounded cut when
    size computations were costed as values) must not cost the symbolic
    program: the default partition splits it, with a warning."""
    import logging

    from retrograd.passes import checkpoint

    def broken(*args, **kwargs):
        raise RuntimeError("a planner bug")
    make = lambda rows: torch.randn(rows, 5, dtype=torch.float64)
    compiled = retrograd.compile(chain)
    _check_gradients(compiled, chain, make(2))   # the static program plans as usual
    monkeypatch.setattr(checkpoint, "run", broken)
    with caplog.at_level(logging.WARNING, logger="retrograd"):
        for rows in (3, 7):
            _check_gradients(compiled, chain, make(rows))
    assert _symbolic_compiler(compiled).checkpoint is None
    assert compiled._cache.compiles == 2
    assert any("checkpoint plan failed on the symbolic program (RuntimeError: a planner bug)"
               in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name", ["lora", pytest.param("gpt2_tiny", marks=pytest.mark.slow)])
def test_zoo_models_get_the_plan_and_save_no_more_than_the_default(name, monkeypatch):
    """The plan applies to LoRA and GPT-2 (it raised on them: size computations
    read only by a recomputed view were not handed to the backward), matches
    eager at an untraced batch size and saves no more than the default."""
    from zoo import ZOO, assert_parity, training_step
    entry = ZOO[name]
    base = entry.inputs()

    def batch(rows):
        return tuple(torch.cat([v] * 4)[:rows].detach().requires_grad_(v.requires_grad)
                     for v in base)
    compiled, models = {}, {}
    for face in ("ours", "default"):
        torch.manual_seed(0)
        models[face] = entry.model()
        with monkeypatch.context() as patch:
            if face == "default":
                patch.setattr(symbolic_partition, "partition", lambda *args: None)
            compiled[face] = retrograd.compile(models[face], executor="fx")
            for rows in (2, 3):
                training_step(entry, compiled[face], models[face], batch(rows))
    assert _symbolic_compiler(compiled["ours"]).checkpoint is not None
    torch.manual_seed(0)
    reference = entry.model()
    inputs = batch(5)   # never traced
    models["ours"].zero_grad()
    assert_parity(training_step(entry, compiled["ours"], models["ours"], inputs),
                  training_step(entry, reference, reference, inputs))
    saved = {face: measured_saved_bytes(lambda *x, face=face: entry.run(compiled[face], x),
                                        *inputs, keep=list(models[face].parameters()))
             for face in compiled}
    assert saved["ours"] <= saved["default"], saved
