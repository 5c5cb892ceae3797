"""The zoo's attention block and GPT-2 as symbolic programs (issue 14 item 4):
compiled at two batch sizes (the second symbolic), their layer norms,
softmax and GPT-2's log-softmax loss run as row-wise size-generic kernels
(``sized_rows_*``, asserted by name in the dump), gradients match eager at a
third batch size, and fewer ops are left as torch calls than with the row
fuser off (the program before it)."""

from __future__ import annotations

import pytest
import retrograd
import torch
from zoo import ZOO, assert_parity, training_step

pytestmark = pytest.mark.usefixtures("cache")


def _compile(entry, folder, rows_on: bool, monkeypatch):
    """The entry's model compiled at batch sizes 2 and 3; its reports."""
    from retrograd import symbolic_rows
    torch.manual_seed(0)
    model = entry.model()
    base = entry.inputs()

    def batch(rows):
        return tuple(torch.cat([v] * 4)[:rows].detach().requires_grad_(v.requires_grad)
                     for v in base)
    with monkeypatch.context() as patch:
        if not rows_on:
            patch.setattr(symbolic_rows, "fuse_rows", lambda gm, interpreted: 0)
        compiled = retrograd.compile(model, executor="interpret", dump_dir=str(folder))
        for rows in (2, 3):
            training_step(entry, compiled, model, batch(rows))
    return compiled, model, batch


def _kernels(folder, half: str) -> list[str]:
    return sorted(p.stem for p in folder.glob(f"s*-{half}/kernels/sized_rows_*.py"))


@pytest.mark.parametrize("name, forward_kernels, backward_ops", [
    ("attention_block", {"var_mean", "amax"}, set()),
    pytest.param("gpt2_tiny", {"var_mean", "log_softmax"},
                 {"aten._log_softmax_backward_data.default"}, marks=pytest.mark.slow)])
def test_zoo_symbolic_programs_run_norms_and_softmax_as_row_kernels(
        name, forward_kernels, backward_ops, tmp_path, monkeypatch):
    entry = ZOO[name]
    compiled, model, batch = _compile(entry, tmp_path / "on", True, monkeypatch)
    before, _, _ = _compile(entry, tmp_path / "off", False, monkeypatch)
    torch.manual_seed(0)
    reference = entry.model()
    inputs = batch(5)   # never traced
    model.zero_grad()
    assert_parity(training_step(entry, compiled, model, inputs),
                  training_step(entry, reference, reference, inputs))
    forward = _kernels(tmp_path / "on", "forward")
    assert forward_kernels <= {k.split("_", 2)[2].rsplit("_", 1)[0].rstrip("_0123456789")
                               for k in forward}, forward
    assert _kernels(tmp_path / "on", "backward"), "no row kernel in the backward"
    assert not _kernels(tmp_path / "off", "forward")
    for half in ("forward", "backward"):
        now, then = compiled.reports[half]["kernels"], before.reports[half]["kernels"]
        assert now["extern"] < then["extern"], (half, now["extern"], then["extern"])
        left = set(now["extern_ops"])
        assert not left & {"aten.var_mean.correction", "aten.amax.default",
                           "aten._log_softmax.default", *backward_ops}, left
