"""The arena windows' footprint counts each storage once
(passes/planning/windows.py): a ``wait_tensor``'s result is the storage its
collective returned, by the alias rule the lifetimes share
(``planning/lifetimes.storage_owners``), not bytes of its own."""

from __future__ import annotations

import torch
from pass_helpers import collective_kernel as _extern
from pass_helpers import flat_buffer as _buffer
from retrograd.ir import Buffer, Kernel, Program
from retrograd.passes import schedule
from retrograd.passes.planning import windows
from retrograd.passes.planning.lifetimes import lifetimes, storage_owners

ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default
WAIT = torch.ops._c10d_functional.wait_tensor.default


def reduced_then_read() -> Program:
    """``g`` made, all-reduced into ``r`` (1,000 floats), waited for as
    ``w`` (the same tensor), read by two kernels; ``d`` the output."""
    buffers = {name: _buffer(name, 1000) for name in ("g", "r", "w")}
    buffers.update(x=_buffer("x", 10, "input"), e=_buffer("e", 10), d=_buffer("d", 10, "output"))
    kernels = [Kernel("grad", "triton", [], ["x"], ["g"]),
               _extern("issue", ALL_REDUCE, ["g"], ["r"]),
               Kernel("other", "triton", [], ["x"], ["e"]),
               _extern("wait", WAIT, ["r"], ["w"]),
               Kernel("use", "triton", [], ["w", "e"], ["d"])]
    return Program("reduced", buffers, kernels, inputs=["x"], outputs=["d"])


def test_wait_result_is_its_collectives_storage():
    program = reduced_then_read()
    assert [k.op for k in program.kernels[1::2]] == [str(ALL_REDUCE), str(WAIT)]
    assert storage_owners(program) == {"w": "r"}
    spans = lifetimes(program)
    lives = windows.storage_lives(program, spans, planned=set())
    assert "w" not in lives and lives["r"] == (1, 4), lives   # issue .. last reader of w
    held = windows.base_footprint(program, spans, planned=set())
    # at the wait: g (read by the network until then), r once (w counted apart
    # made it 12,040) and e
    assert held[3] == 4000 + 4000 + 40, held
    assert max(held) == held[3]
    assert schedule.held_peak(program) == max(held)


def test_wait_of_a_view_and_a_chain_of_waits_share_the_owner():
    program = reduced_then_read()
    program.buffers["v"] = Buffer("v", (1000,), (1,), "float32", "view", view_of="r")
    program.kernels.insert(3, Kernel("view", "view", [], ["r"], ["v"]))
    program.kernels[4].inputs = ["v"]
    program.buffers["w2"] = _buffer("w2", 1000)
    program.kernels.insert(5, _extern("wait2", WAIT, ["w"], ["w2"]))
    program.kernels[6].inputs = ["w2", "e"]
    assert storage_owners(program) == {"w": "r", "w2": "r"}
    lives = windows.storage_lives(program, lifetimes(program), planned=set())
    assert set(lives) == {"g", "r", "e", "d"} and lives["r"] == (1, 6), lives
