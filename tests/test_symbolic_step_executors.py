"""compile_step's symbolic program under each executor ("fx", "torch",
"interpret"), with and without the cleanup pass: parameters and optimizer
state equal an eager loop at sizes after the second.

Regression: make_fx writes the traced step's ``forward`` to take the step's
inputs as the nested structure they were passed in; the executors call it
with the flat list. Cleanup's copy of the graph happened to flatten the
signature, so the "fx" executor failed (``forward() missing 4 required
positional arguments``) wherever cleanup did not replace the graph:
``disable=("cleanup",)``, or a cleanup that needed a guard on the sizes."""

from __future__ import annotations

import pytest
import retrograd
import torch
from checks import assert_close, eager_step

pytestmark = pytest.mark.usefixtures("cache")


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 6,
                                                        dtype=torch.float64).reshape(2, 3))

    def forward(self, x):
        return torch.tanh(x @ self.weight).sum()


def _loss(model, x):
    return model(x)


@pytest.mark.parametrize("disable", [(), ("cleanup",)], ids=["cleanup", "no-cleanup"])
@pytest.mark.parametrize("executor", ["fx", "torch", "interpret"])
def test_every_executor_runs_the_symbolic_step(executor, disable):
    torch.manual_seed(0)
    model, reference = _Tiny(), _Tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    eager = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    step = retrograd.compile_step(model, _loss, optimizer, executor=executor, disable=disable)
    for rows in (4, 3, 5):
        x = torch.randn(rows, 2, dtype=torch.float64)
        assert_close(step(x), eager_step(reference, eager, _loss, x), torch.float64,
                     what=f"loss at {rows} rows")
    assert_close(model.weight, reference.weight, torch.float64, what="weight")
    assert_close(optimizer.state[model.weight]["momentum_buffer"],
                 eager.state[reference.weight]["momentum_buffer"], torch.float64,
                 what="momentum")
    assert step.dynamic.compiles == 1
    assert step.reports["step"]["symbolic"]["executor"] == executor
