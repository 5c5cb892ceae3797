"""One decomposition table entry point: ``capture.decompositions_for``.

Every trace asks it for its table (``joint_graph``, ``compile``, ``grad``,
``compile_step``, static and symbolic), so replacing that one function
reaches each of them. Before, ``joint_graph`` read ``decomposition_table()``,
compile ``table_for(executor)`` and compile_step its own import of it, and a
test that sabotaged a decomposition had to patch each (or silently tested
nothing). Checked by a wrong ``tanh`` decomposition, which must show up in
every face's result.
"""

from __future__ import annotations

import pytest
import retrograd
import retrograd.capture
import torch
from retrograd.decompositions import TORCH_WHOLE, decomposition_table, table_for

pytestmark = pytest.mark.usefixtures("fresh_dynamo", "no_dump_env")

aten = torch.ops.aten


def _wrong_tanh(x):
    return torch.sigmoid(2 * x)   # tanh(x) is 2 * sigmoid(2x) - 1


@pytest.fixture
def asked(monkeypatch) -> list:
    """The executors the entry point was asked for; it answers a table whose
    ``tanh`` is wrong."""
    table = dict(decomposition_table())
    table[aten.tanh.default] = _wrong_tanh
    calls: list = []

    def sabotaged(executor, tensors):
        calls.append(executor)
        return table
    monkeypatch.setattr(retrograd.capture, "decompositions_for", sabotaged)
    return calls


class _Tanh(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 6).reshape(2, 3))

    def forward(self, x):
        return (torch.tanh(x @ self.weight).sum(),)


def test_joint_graph_asks_the_entry_point(asked):
    joint, _, _ = retrograd.capture.joint_graph(_Tanh(), [torch.randn(4, 2)], executor="torch")
    targets = {node.target for node in joint.graph.nodes}
    assert aten.sigmoid.default in targets and aten.tanh.default not in targets
    assert asked == ["torch"]


def test_compile_and_grad_ask_the_entry_point(asked):
    x = torch.linspace(-1.0, 1.0, 5, requires_grad=True)
    compiled = retrograd.compile(lambda t: torch.tanh(t).sum(), executor="fx")
    assert not torch.allclose(compiled(x), torch.tanh(x).sum())
    gradient = retrograd.grad(lambda t: torch.tanh(t).sum(), executor="fx")(x.detach())
    assert not torch.allclose(gradient, 1 - torch.tanh(x.detach()) ** 2)
    assert asked == ["fx", "fx"]


@pytest.mark.parametrize("dynamic, executors", [(False, ["torch", "torch"]),
                                                 (None, ["torch", None])])
def test_compile_step_asks_the_entry_point(asked, dynamic, executors):
    """The static step traces with the option's executor; the symbolic step
    (by default, at a second batch size) with every decomposition (``None``)."""
    model = _Tanh()
    step = retrograd.compile_step(model, lambda m, x: m(x)[0], executor="torch",
                                  dynamic=dynamic)
    for rows in (4, 3):
        x = torch.randn(rows, 2)
        assert not torch.allclose(step(x), _Tanh()(x)[0].detach())
    assert asked == executors


def test_the_entry_point_follows_the_executor():
    """What the unpatched entry point answers: the torch program's table for
    ``"torch"`` (the ``TORCH_WHOLE`` ops left whole), every decomposition for
    ``None`` and the interpreter. Compared by those ops, not by whole key sets:
    torch's registry grows as modules are imported (c10d_functional, test
    ops), so two tables cached at different times in one process differ in
    entries that have nothing to do with the executor."""
    cpu = [torch.ones(2)]
    torch_table = retrograd.capture.decompositions_for("torch", cpu)
    assert torch_table is table_for("torch", cpu)
    assert not TORCH_WHOLE & torch_table.keys()
    assert retrograd.capture.decompositions_for(None, cpu) is decomposition_table(executor=None)
    for executor in (None, "interpret"):
        table = retrograd.capture.decompositions_for(executor, cpu)
        assert TORCH_WHOLE <= table.keys(), (executor, TORCH_WHOLE - table.keys())


@pytest.mark.parametrize("face", ["standalone", "torch.compile"])
def test_symbolic_faces_ask_the_entry_point(asked, face):
    """At a second size both faces trace once more with the batch symbolic
    (dynamic.compile_symbolic): that trace asks the entry point with the
    option's executor too, as the static one did. Before, it passed AOTAutograd
    no table at all: the symbolic program kept layer norm, softmax and GELU
    whole (no size-generic kernel covered them) and the wrong tanh was not
    seen at the second size."""
    model = _Tanh()
    compiled = retrograd.compile(model, executor="torch") if face == "standalone" else \
        torch.compile(model, backend="retrograd", options={"executor": "torch"})
    for rows in (4, 3, 5):
        x = torch.randn(rows, 2)
        assert not torch.allclose(compiled(x)[0], _Tanh()(x)[0].detach()), rows
    assert asked == ["torch", "torch"]
