"""examples/quickstart.py's kernel line says plainly what ran.

It printed "all N pointwise ops among them: False" under the CPU default,
where GELU and its derivative run whole as extern torch calls: a yes/no
answer to a question the line had not asked. ``describe`` now counts the
pointwise ops the fused kernels took and names the ones kept whole.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import retrograd
import torch

pytestmark = pytest.mark.usefixtures("no_dump_env")

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


def _quickstart():
    spec = importlib.util.spec_from_file_location("quickstart", QUICKSTART)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reports(executor: str) -> dict:
    """The forward and backward reports of a small GELU MLP's first step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    compiled = retrograd.compile(model, executor=executor)
    (compiled(torch.randn(3, 4)) * 2).sum().backward()
    return compiled.reports


def test_the_cpu_default_names_the_pointwise_ops_it_kept_whole():
    lines = {half: _quickstart().describe(report)
             for half, report in _reports("torch").items()}
    assert "False" not in lines["forward"] + lines["backward"]
    assert "0 of the 1 pointwise ones (the other 1 run whole as extern calls: gelu x1)" \
        in lines["forward"]
    assert "gelu_backward x1" in lines["backward"]
    assert "extern calls in all: addmm x2, gelu x1" in lines["forward"]


def test_the_interpreter_fuses_every_pointwise_op():
    reports = _reports("interpret")
    for report in reports.values():
        kernels = report["kernels"]
        line = _quickstart().describe(report)
        assert (f"{kernels['triton']} fused kernels cover {kernels['ops_in_triton']} aten ops, "
                f"all {kernels['pointwise_ops']} pointwise ones;") in line
