"""The schedule pass on hand-built programs: readers of an updated input run
before the update (so buffer_reuse can write it in place), and fusion
outputs held across the peak are reported."""

from __future__ import annotations

from retrograd.ir import Kernel, Program
from retrograd.passes import buffer_reuse
from pass_helpers import buffer, context
from pass_helpers import seeded  # noqa: F401  (autouse: each test from seed 0)


def _update_program() -> Program:
    """k0: x -> g; update: p, g -> new_p; k2 (extern): p, x -> y. The update
    comes before the last reader of the old p, in fusion's order."""
    buffers = {"p": buffer("p", (8,), "input"), "x": buffer("x", (8,), "input"),
               "g": buffer("g", (8,)), "new_p": buffer("new_p", (8,), "output"),
               "y": buffer("y", (8,), "output")}
    kernels = [Kernel("pointwise_g", "triton", [], ["x"], ["g"]),
               Kernel("pointwise_update", "triton", [], ["p", "g"], ["new_p"]),
               Kernel("extern_use", "extern", [], ["p", "x"], ["y"])]
    program = Program("update", buffers, kernels, inputs=["p", "x"], outputs=["new_p", "y"])
    program.updates = {"new_p": "p"}
    return program


def test_schedule_runs_readers_of_an_updated_input_before_its_update():
    from retrograd.passes import schedule
    program = _update_program()
    schedule.run(program, context())
    order = [k.name for k in program.kernels]
    assert order.index("extern_use") < order.index("pointwise_update")
    stats = buffer_reuse.run(program, context()).stats
    assert stats["updates_in_place"] == 1 and program.buffers["new_p"].reuses == "p"
    # p stays referenced until the update has written over it
    freed_at = next(i for i, names in program.frees.items() if "p" in names)
    assert freed_at == order.index("pointwise_update")


def test_an_update_before_a_later_reader_stays_out_of_place():
    program = _update_program()             # fusion's order, not rescheduled
    stats = buffer_reuse.run(program, context()).stats
    assert stats["updates_in_place"] == 0 and stats["updates_out_of_place"] == 1
    assert program.buffers["new_p"].reuses is None


def test_schedule_reports_fusion_outputs_held_across_the_peak():
    """k0 (two nodes fused) writes a and b; a is read only at the end, so it is
    held across the peak at k1, where c is made: reported, with its bytes."""
    from retrograd.passes import schedule
    buffers = {"x": buffer("x", (4,), "input"), "a": buffer("a", (4,)), "b": buffer("b", (4,)),
               "c": buffer("c", (64,)), "out": buffer("out", (4,), "output")}
    kernels = [Kernel("pointwise_ab", "triton", ["node a", "node b"], ["x"], ["a", "b"]),
               Kernel("pointwise_c", "triton", ["node c"], ["b"], ["c"]),
               Kernel("reduction_out", "triton", ["node out"], ["a", "c"], ["out"])]
    program = Program("held", buffers, kernels, inputs=["x"], outputs=["out"])
    assert schedule.held_by_fusion(program) == [
        {"kernel": "pointwise_ab", "buffer": "a", "bytes": 16}]
    stats = schedule.run(program, context()).stats
    assert stats["peak_held_by_fusion_bytes"] == 16
    program.kernels[0].nodes = ["node a"]          # not a fusion: nothing to report
    assert schedule.held_by_fusion(program) == []
