"""The checkpoint plan's predicted peak against the measured step peak.

``ledger.predicted_peak`` is what the peak guard (passes/planning/budget.py)
holds monotone, so it must rank plans as the step's measured peak does. A
saved value used to count alive to the end of the backward, although the
backward program frees it after its last reader: saving less then always
looked cheaper, the guard let plans through whose recomputed values raise
the backward's peak, and the figure sat far above the measurement (the zoo's
attention block at 1.0: 30,400 bytes predicted, 17,736 measured; at 0.25 the
guard said it held while the measured peak rose 1,664 bytes above 0.5's;
the zoo's LLaMA rose 1,172 bytes from 0.75 to 0.5, benchmarks/pareto.py).

Measured here on the torch program (the CPU default's executor), after two
warm-up steps, with ``measuring.profiled_peak``.
"""

from __future__ import annotations

import itertools
import sys
import warnings
from pathlib import Path

import pytest
import retrograd
import torch
from retrograd.passes.planning import budget
from zoo import ZOO, clone_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from measuring import profiled_peak

#: How far above the measured step peak the prediction may sit: it counts
#: before fusion and the arena (measured at the change: 1.07-1.18x on the
#: attention block, 1.0-1.1x on the MLP; 1.71x before it).
ABOVE = 1.25

#: How far below it: the prediction places a recomputed value just before its
#: first reader in the joint graph's order, the schedule may run it earlier.
#: Since views count as their base's storage (no slack left from counting them
#: twice), the attention block at 0.75 predicts 16,832 bytes for a measured
#: 16,904: the recomputed mask ``bitwise_not`` (64 of the 72 bytes) runs in
#: kernel 22 of the backward, read in kernel 59 (measured at the change).
BELOW = 0.99


def _row(name: str, fraction: float) -> tuple[int, int, bool]:
    """(measured step peak, predicted peak, guard held) at ``fraction``."""
    entry = ZOO[name]
    torch.manual_seed(0)
    model, inputs = entry.model(), entry.inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = retrograd.compile(model, executor="torch", memory_budget=fraction)
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            entry.run(compiled, clone_inputs(inputs)).backward()
    model.zero_grad(set_to_none=True)
    batch = clone_inputs(inputs)
    measured = profiled_peak(lambda: entry.run(compiled, batch).backward())
    [stats] = [p["stats"] for p in compiled.reports["forward"]["passes"]
               if p["name"] == "checkpoint"]
    return measured, stats["predicted_peak_bytes"], stats["peak_guard"]["monotone"]


@pytest.mark.parametrize("name", ["mlp", "attention_block", "cnn"])
def test_the_prediction_ranks_the_ladder_as_the_measurement(name):
    """Along 1.0 -> 0.75 -> 0.5 -> 0.25: where the guard says it held, the
    measured step peak does not rise either; and the prediction stays within
    ``ABOVE`` of the measurement and at most 1% below it (``BELOW``). The CNN's
    peak is its convolutions' scratch (``tests/test_peak_scratch.py``):
    without it the prediction sat at 8,800 bytes for every budget while the
    measurement rose from 33,196 (0.75) to 33,708 (0.5)."""
    rows = {fraction: _row(name, fraction) for fraction in budget.LADDER}
    for fraction, (measured, predicted, _) in rows.items():
        assert BELOW * measured <= predicted <= ABOVE * measured, (fraction, rows)
    for looser, tighter in itertools.pairwise(budget.LADDER):
        if rows[tighter][2]:
            assert rows[tighter][0] <= rows[looser][0], (looser, tighter, rows)


@pytest.mark.slow
def test_llama_measured_peak_never_rises_along_the_ladder():
    """transformers' LLaMA (tests/hf_zoo.py, SDPA attention) as
    ``benchmarks/pareto.py`` measures it, each budget in a fresh process.
    Before: 101,652 bytes at 0.75, 102,824 at 0.5. The plan at 0.5
    recomputed layer 0's input RMSNorm and key projection for its attention
    backward, and those (the embedding, the normed input and its view, 6,208
    bytes with two norm-backward terms fused into the recomputation) lived
    across it; the prediction, counting the saved values of layer 1 alive to
    the end of the backward, had the plan at 0.5 13.6 kB below 0.75's there."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import pareto
    rows = [(fraction, row["peak_bytes"], row["predicted_peak_bytes"]) for fraction in
            budget.LADDER for row in [pareto.isolated("llama", "retrograd", fraction)]]
    for (looser, *before), (tighter, *after) in itertools.pairwise(rows):
        assert after[0] <= before[0], f"measured: {tighter} peaks above {looser}: {rows}"
        assert after[1] <= before[1], f"predicted: {tighter} peaks above {looser}: {rows}"
