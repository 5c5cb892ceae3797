"""The fx executor's evaluation of fused nodes: fills from metadata alone,
in-register views read from their register."""

from __future__ import annotations

import torch

from pass_helpers import trace
from pass_helpers import seeded  # noqa: F401  (autouse: each test from seed 0)


def test_fx_executor_fills_need_only_the_shape_of_what_they_are_like():
    """A fill inlined where the value it is shaped like is not (yet, or any
    more) in memory is made from metadata: nothing is recomputed."""
    from retrograd.runtime.executor import _evaluate
    gm = trace(lambda x: (torch.zeros_like(x.sin()),), torch.randn(3, 4))
    fill = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.zeros_like.default)
    env: dict = {}
    value = _evaluate(fill, env)
    assert torch.equal(value, torch.zeros(3, 4)) and env == {}


def test_fx_executor_reads_an_in_register_view_from_its_register():
    from retrograd.runtime.executor import _evaluate
    gm = trace(lambda x: (x.sin().view(12) * 2,), torch.randn(3, 4))
    view = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.view.default)
    mul = next(iter(view.users))
    sin = view.args[0]
    env = {"sin_register": torch.arange(12.0).view(3, 4)}
    got = _evaluate(mul, env, {view.name: "sin_register"})
    assert torch.equal(got, torch.arange(12.0) * 2) and sin.name not in env
