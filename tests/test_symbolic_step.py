"""compile_step with dynamic sizes (compiler/step_dynamic.py): after a batch
dimension's second size one symbolic step program serves the later sizes;
parameters and optimizer state match an eager loop at sizes never traced."""

from __future__ import annotations

import copy
import logging

import pytest
import retrograd
import torch
from checks import assert_close, eager_step


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RETROGRAD_CACHE_DIR", str(tmp_path / "cache"))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 3)).double()


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def _batch(rows: int):
    return (torch.randn(rows, 6, dtype=torch.float64), torch.randn(rows, 3, dtype=torch.float64))


@pytest.mark.parametrize("executor", ["torch", "interpret"])
def test_ten_batch_sizes_compile_two_step_programs_and_match_eager(executor, caplog):
    model, reference = _model(), _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    eager = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    step = retrograd.compile_step(model, _loss, optimizer, executor=executor)
    with caplog.at_level(logging.INFO, logger="retrograd"):
        for rows in (4, 5, 7, 13, 4, 2, 9, 31, 6, 11):
            batch = _batch(rows)
            assert_close(step(*batch), eager_step(reference, eager, _loss, *batch),
                         torch.float64)
            for (name, a), b in zip(model.named_parameters(), reference.parameters()):
                assert_close(a, b, torch.float64, what=name)
                assert_close(optimizer.state[a]["exp_avg_sq"], eager.state[b]["exp_avg_sq"],
                             torch.float64, what=f"{name} exp_avg_sq")
    assert len(step.entries) == 1 and step.dynamic.compiles == 1
    symbolic = step.reports["step"]["symbolic"]
    assert symbolic["dims"] == "batch input 0 dim 0, batch input 1 dim 0"
    assert symbolic["executor"] == executor and "L['t" in symbolic["guards"]
    assert any("tracing with them symbolic" in r.getMessage() for r in caplog.records)
    runner = step.dynamic.last.runner
    assert runner.last_plan.arena_bytes, runner.last_plan   # arenas sized for 11 rows
    if executor == "interpret":
        assert step.reports["step"]["kernels"]["triton"] >= 1


def test_dynamic_false_keeps_a_static_step_program_per_size():
    model, reference = _model(), _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    eager = torch.optim.SGD(reference.parameters(), lr=0.1)
    step = retrograd.compile_step(model, _loss, optimizer, dynamic=False, executor="torch")
    for rows in (3, 4, 5):
        batch = _batch(rows)
        step(*batch)
        eager_step(reference, eager, _loss, *batch)
    for a, b in zip(model.parameters(), reference.parameters()):
        assert_close(a, b, torch.float64)
    assert len(step.entries) == 3 and step.dynamic.compiles == 0


def test_a_batch_the_guards_refuse_is_traced_again():
    """A size of 1 is never a symbol: the first symbolic program's guards
    refuse a batch of one row, which is traced again (that size fixed in the
    new program's guards); a second one-row batch reuses it."""
    model = _model()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    eager = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    step = retrograd.compile_step(model, _loss, optimizer, executor="torch")
    for rows in (3, 5, 1, 8, 1):
        batch = _batch(rows)
        assert_close(step(*batch), eager_step(reference, eager, _loss, *batch), torch.float64)
    for a, b in zip(model.parameters(), reference.parameters()):
        assert_close(a, b, torch.float64)
    assert step.dynamic.compiles == 2 and len(step.entries) == 1   # size 3 static
    (first, one_row), = step.dynamic.programs.values()
    assert step.dynamic.last is one_row
    step(*_batch(6))
    assert step.dynamic.last is first and step.dynamic.compiles == 2
