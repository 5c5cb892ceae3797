"""Bucketed all-reduce in one process: DDP's bucket assignment, the schedule
around collectives (issues early and in order, waits late), fusion keeping
a collective's result apart from the compute before it, and the predicted
overlap (passes/planning/collectives.py). The two-process runs are in
tests/test_distributed.py."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch
from pass_helpers import collective_kernel as _extern
from pass_helpers import context, trace
from pass_helpers import flat_buffer as _buffer
from retrograd.buckets import Limits, assign
from retrograd.ir import Kernel, Program
from retrograd.passes import fusion, schedule
from retrograd.passes.op_classes import RECOMPUTED
from retrograd.passes.planning import collectives, comm_timeline

ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default
WAIT = torch.ops._c10d_functional.wait_tensor.default

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch built without torch.distributed")


def test_buckets_match_ddp_assignment():
    """``assign`` packs as DDP's ``_compute_bucket_assignment_by_size`` (per
    dtype, a first limit then the rest), issued in DDP's reversed order."""
    chooser = random.Random(0)
    dtypes = [torch.float32, torch.float64, torch.float16]
    for trial in range(200):
        tensors = [torch.empty(chooser.randint(1, 300), dtype=chooser.choice(dtypes))
                   for _ in range(chooser.randint(1, 12))]
        first, rest = chooser.randint(1, 2000), chooser.randint(1, 3000)
        limits = [first, rest] if trial % 2 else [rest]
        theirs, _ = torch.distributed._compute_bucket_assignment_by_size(
            tensors, limits, [False] * len(tensors))
        mine = assign([(t.numel() * t.element_size(), t.dtype) for t in tensors],
                      Limits(limits[0], limits[-1]))
        assert mine == [sorted(bucket, reverse=True) for bucket in reversed(theirs)], trial


def test_bucket_cap_mb_is_checked():
    assert Limits.from_megabytes(None) == Limits(1 << 20, 25 << 20)   # DDP's defaults
    assert Limits.from_megabytes(2) == Limits(2 << 20, 2 << 20)
    for bad in (0, -1, True, "25"):
        with pytest.raises(ValueError, match="bucket_cap_mb"):
            Limits.from_megabytes(bad)


def two_buckets() -> Program:
    """A backward in two halves with a bucket each, in traced order: each
    all-reduce is waited for at once, and the second half's gradient ``g2``
    is computed after the first bucket's wait."""
    names = {"x": "input", "g1": "temporary", "r1": "temporary", "s1": "temporary",
             "g2": "temporary", "r2": "temporary", "s2": "temporary",
             "o1": "output", "o2": "output"}
    buffers = {name: _buffer(name, 1000, role) for name, role in names.items()}
    kernels = [Kernel("grad_1", "triton", [], ["x"], ["g1"]),
               _extern("all_reduce_1", ALL_REDUCE, ["g1"], ["r1"]),
               _extern("wait_1", WAIT, ["r1"], ["s1"]),
               Kernel("update_1", "triton", [], ["s1"], ["o1"]),
               Kernel("grad_2", "triton", [], ["x"], ["g2"]),
               _extern("all_reduce_2", ALL_REDUCE, ["g2"], ["r2"]),
               _extern("wait_2", WAIT, ["r2"], ["s2"]),
               Kernel("update_2", "triton", [], ["s2"], ["o2"])]
    return Program("two_buckets", buffers, kernels, inputs=["x"], outputs=["o1", "o2"])


def test_schedule_issues_collectives_early_and_waits_late():
    program = two_buckets()
    stats = schedule.run(program, context()).stats
    order = [kernel.name for kernel in program.kernels]
    position = {name: index for index, name in enumerate(order)}
    assert position["all_reduce_1"] < position["all_reduce_2"]   # the traced order, kept
    assert position["wait_1"] > position["grad_2"]   # the second half's compute overlaps
    assert order[:4] == ["grad_1", "all_reduce_1", "grad_2", "all_reduce_2"], order
    communication = stats["communication"]
    assert communication["count"] == 2 and communication["bytes"] == 8000
    first = communication["collectives"][0]
    assert first["issued_at"] == 1 and first["kernels_between"] == 1
    # no process group here: the wire bytes and times are unknown, not guessed
    assert first["wire_bytes"] is None and communication["overlap_fraction"] is None


def test_schedule_keeps_the_issue_order_when_a_later_bucket_is_ready_first():
    """Every rank must issue the same collectives in the same order: the
    second all-reduce's bucket is ready first and issuing it would free its
    gradient (the memory-first choice), it still goes second."""
    program = two_buckets()
    grad_1, issue_1, wait_1, update_1, grad_2, issue_2, wait_2, update_2 = program.kernels
    program.kernels = [grad_2, grad_1, issue_1, wait_1, update_1, issue_2, wait_2, update_2]
    schedule.run(program, context())
    order = [kernel.name for kernel in program.kernels]
    assert order.index("all_reduce_1") < order.index("all_reduce_2"), order


def test_predicted_overlap_counts_the_compute_under_each_collective(monkeypatch):
    """Two ranks (monkeypatched): an all-reduce of 4,000 bytes sends 4,000
    bytes in 2 ring steps. Waited for at once, none of it hides; after the
    schedule, the compute between issue and wait hides that much of it."""
    monkeypatch.setattr(comm_timeline, "group_size", lambda kernel: 2)
    program = two_buckets()
    before = comm_timeline.predict(program)
    seconds = 4000 / comm_timeline.LINK_BYTES + 2 * comm_timeline.LINK_LATENCY
    assert before["wire_bytes"] == 8000
    assert before["collectives"][0]["seconds"] == pytest.approx(seconds)
    assert before["overlapped_seconds"] == 0 and before["overlap_fraction"] == 0
    assert before["step_seconds"] == pytest.approx(before["step_seconds_waited_at_once"])
    schedule.run(program, context())
    after = comm_timeline.predict(program)
    order = [kernel.name for kernel in program.kernels]
    assert order[2:] == ["grad_2", "all_reduce_2", "wait_1", "update_1", "wait_2", "update_2"]
    # grad_2 runs under the first all-reduce, update_1 under the second (both
    # far shorter than the link's latency); the waits stall for the rest
    grad = comm_timeline.kernel_seconds(program, program.kernels[2])
    update = comm_timeline.kernel_seconds(program, program.kernels[5])
    assert grad > 0 and update > 0
    rows = after["collectives"]
    assert rows[0]["overlapped_seconds"] == pytest.approx(grad)
    assert rows[1]["overlapped_seconds"] == pytest.approx(update)
    assert rows[0]["exposed_seconds"] == pytest.approx(seconds - grad)
    assert after["overlapped_seconds"] == pytest.approx(grad + update)
    assert after["step_seconds"] < before["step_seconds"]
    assert math.isclose(after["compute_seconds"], before["compute_seconds"])


def test_fusion_keeps_a_collectives_result_apart_from_the_compute_before_it():
    """A parameter's update (from a bucket's all-reduce) read ``x`` as an
    unrelated backward value did, and fusion put the two in one kernel: the
    backward then waited for the network. Now they stay in two kernels."""
    def step(x, grad):
        reduced = WAIT(ALL_REDUCE(grad * 0.5, "sum", "0"))
        updated = x - 0.1 * reduced           # after the wait
        other = torch.sin(x) * 3.0            # backward work, not after it
        return updated, other

    gm = trace(step, torch.randn(16), torch.randn(16))
    program = fusion.run(gm, context()).subject
    kernel_of = {node.name: kernel.name for kernel in program.kernels_of("triton")
                 for node in kernel.nodes}
    assert kernel_of["sub"] != kernel_of["mul_2"], kernel_of
    schedule.run(program, context())
    order = [kernel.name for kernel in program.kernels]
    wait = next(i for i, k in enumerate(program.kernels) if collectives.is_wait(k))
    assert order.index(kernel_of["mul_2"]) < wait, order


def test_dump_page_draws_the_predicted_timeline(monkeypatch):
    """The dump page's communication section: a link bar per collective, the
    compute's stalls at the waits, the table; none without collectives."""
    from retrograd.comm_timeline import communication_html
    monkeypatch.setattr(comm_timeline, "group_size", lambda kernel: 2)
    program = two_buckets()
    schedule.run(program, context())
    summary = comm_timeline.predict(program)
    text = communication_html({"communication": summary})
    assert "predicted timeline" in text and "Predicted, not measured" in text
    assert text.count('fill="#e67e22"') == 2   # the link lane: one bar per all-reduce
    assert text.count('fill="#c0392b"') == 2   # the compute waits at both waits
    assert text.count("<tr>") == 3 and "all_reduce" in text
    hidden = round(100 * summary["overlap_fraction"])
    assert f"hides {hidden}% of the communication" in text
    assert communication_html({"communication": None}) == ""


GATHER = torch.ops._c10d_functional.all_gather_into_tensor.default


def _fsdp_kernel(name: str, kind: str, unit: int, recomputed: bool, inputs: list[str],
                 outputs: list[str], target=None) -> Kernel:
    """A kernel of FSDP2 unit ``unit``'s (re-)gather, marked as compiler/fsdp.py
    and the checkpoint pass mark its nodes."""
    meta = {"custom": {collectives.FSDP_UNIT: unit, collectives.RESHARD: True}}
    if recomputed:
        meta[RECOMPUTED] = True
    node = SimpleNamespace(target=target, name=name, meta=meta,
                           args=(None, 2, "no such group"))
    return Kernel(name, kind, [node], inputs, outputs)


def _gather(unit: int, recomputed: bool, shard: str, mark: str) -> list[Kernel]:
    """Flatten ``shard``, all-gather it, wait: unit ``unit``'s parameters ``p<mark>``."""
    return [_fsdp_kernel(f"flat{mark}", "triton", unit, recomputed, [shard], [f"c{mark}"]),
            _fsdp_kernel(f"gather{mark}", "extern", unit, recomputed, [f"c{mark}"],
                         [f"r{mark}"], GATHER),
            _fsdp_kernel(f"wait{mark}", "extern", unit, recomputed, [f"r{mark}"],
                         [f"p{mark}"], WAIT)]


def two_resharding_units() -> Program:
    """Two FSDP2 units that reshard after the forward, in traced order: the
    forward gathers each unit's parameters (``pA``, ``pB``), the loss and the
    head's backward (``head_back``, no parameters), then each unit's
    backward on its parameters gathered again (``pB2`` then ``pA2``)."""
    names = ["c", "r", "p", "c2", "r2", "p2"]
    buffers = {f"{n[0]}{unit}{n[1:]}": _buffer(f"{n[0]}{unit}{n[1:]}", 1000)
               for unit in "AB" for n in names}
    buffers.update({name: _buffer(name, 100, "input") for name in ("x", "sA", "sB")})
    buffers.update({name: _buffer(name, 100) for name in ("h1", "h2", "dh", "d2")})
    buffers["d1"] = _buffer("d1", 100, "output")
    kernels = [*_gather(0, False, "sA", "A"),
               Kernel("forward_1", "triton", [], ["x", "pA"], ["h1"]),
               *_gather(1, False, "sB", "B"),
               Kernel("forward_2", "triton", [], ["h1", "pB"], ["h2"]),
               Kernel("head_back", "triton", [], ["h2"], ["dh"]),
               *_gather(1, True, "sB", "B2"), Kernel("back_2", "triton", [], ["dh", "pB2"], ["d2"]),
               *_gather(0, True, "sA", "A2"), Kernel("back_1", "triton", [], ["d2", "pA2"], ["d1"])]
    return Program("two_units", buffers, kernels, inputs=["x", "sA", "sB"], outputs=["d1"])


def test_fsdp2_regather_waits_for_its_unit_and_its_input_is_made_just_before():
    """Prefetch one unit ahead: the first re-gathered unit's wait, a
    recomputation copy, used to be lazy and pulled forward by the next
    unit's re-gather (which the bound makes wait for it): it ran right after
    the forward, before the head's backward, and both units' re-gathered
    parameters were alive across it; and every gather's flattened input was
    made at the program's start. Now the wait runs only when nothing else
    can (after the head's backward) and each flattening just before its
    gather."""
    program = two_resharding_units()
    schedule.run(program, context())
    order = [kernel.name for kernel in program.kernels]
    position = {name: index for index, name in enumerate(order)}
    assert position["waitB2"] > position["head_back"], order
    assert position["gatherA2"] > position["waitB2"], order
    for mark in ("A", "B", "B2", "A2"):
        assert position[f"flat{mark}"] == position[f"gather{mark}"] - 1, (mark, order)


REDUCE = torch.ops._c10d_functional.reduce_scatter_tensor.default


def _reduce(unit: int, grad: str) -> list[Kernel]:
    """Unit ``unit``'s gradient layout ``l<unit>`` from ``grad``, its
    reduce-scatter and wait (marked as compiler/fsdp.py marks them)."""
    meta = {"custom": {collectives.FSDP_REDUCE: unit}}

    def kernel(name, kind, inputs, outputs, target=None):
        node = SimpleNamespace(target=target, name=name, meta=meta,
                               args=(None, "sum", 2, "no such group"))
        return Kernel(name, kind, [node], inputs, outputs)
    return [kernel(f"layout{unit}", "triton", [grad], [f"l{unit}"]),
            kernel(f"reduce{unit}", "extern", [f"l{unit}"], [f"s{unit}"], REDUCE),
            kernel(f"rwait{unit}", "extern", [f"s{unit}"], [f"g{unit}"], WAIT)]


def three_resharding_units() -> Program:
    """Three FSDP2 units that reshard, traced as compiler/fsdp.py traces
    them: forward gathers, each unit's backward on its re-gathered
    parameters (last unit first), then every unit's gradients laid out and
    reduce-scattered after the whole backward."""
    units = "ABC"
    buffers = {}
    for mark in [*units, *(u + "2" for u in units)]:
        buffers.update({f"{n}{mark}": _buffer(f"{n}{mark}", 1000) for n in "crp"})
    buffers.update({f"s{u}": _buffer(f"s{u}", 100, "input") for u in units})
    buffers["x"] = _buffer("x", 100, "input")
    buffers.update({n: _buffer(n, 100) for n in ("h0", "h1", "h2", "h3", "d3", "d2", "d1")})
    for k in (1, 2, 3):
        buffers.update({f"w{k}": _buffer(f"w{k}", 1000), f"l{k}": _buffer(f"l{k}", 1000),
                        f"s{k}": _buffer(f"s{k}", 500), f"g{k}": _buffer(f"g{k}", 500, "output")})
    kernels = []
    for k, u in enumerate(units, 1):   # the forward
        kernels += [*_gather(k, False, f"s{u}", u),
                    Kernel(f"forward_{k}", "triton", [], [f"h{k - 1}", f"p{u}"], [f"h{k}"])]
    buffers["h0"] = _buffer("h0", 100, "input")
    kernels.append(Kernel("head_back", "triton", [], ["h3"], ["d3"]))
    before = "d3"
    for k, u in ((3, "C"), (2, "B"), (1, "A")):   # the backward, weight gradients w<k>
        kernels += [*_gather(k, True, f"s{u}", u + "2"),
                    Kernel(f"back_{k}", "triton", [], [before, f"p{u}2", f"h{k - 1}"],
                           [f"w{k}", f"d{k - 1}" if k > 1 else "d0"])]
        before = f"d{k - 1}"
    buffers["d0"] = _buffer("d0", 100)
    for k in (3, 2, 1):
        kernels += _reduce(k, f"w{k}")
    outputs = ["g1", "g2", "g3"]
    kernels.append(Kernel("use_d0", "triton", [], ["d0"], ["h_out"]))
    buffers["h_out"] = _buffer("h_out", 100, "output")
    return Program("three_units", buffers, kernels, inputs=["x", "h0", "sA", "sB", "sC"],
                   outputs=outputs + ["h_out"])


def test_fsdp2_reduce_scatters_in_fsdp2_order_one_in_flight_waited_early():
    """compiler/fsdp.py traces every reduce-scatter after the whole backward.
    The issues kept that order, so unit 3's reduce-scatter waited behind
    unit 1's re-gather, and each reduce-scatter's wait ran last (only when
    nothing else was ready): every unit's full gradients (``l<k>``) were
    alive at the backward's end. Now unit 3's reduce-scatter is issued
    before unit 1's re-gather (FSDP2's order), and a reduce-scatter's wait
    runs as soon as the next reduce-scatter could be issued (one in
    flight), before unit 1's backward."""
    program = three_resharding_units()
    program.validate()
    issues = [program.kernels[i].name for i in collectives.issue_order(program)]
    assert issues == ["gatherA", "gatherB", "gatherC", "gatherC2", "gatherB2", "reduce3",
                      "gatherA2", "reduce2", "reduce1"], issues
    schedule.run(program, context())
    position = {kernel.name: index for index, kernel in enumerate(program.kernels)}
    order = [kernel.name for kernel in program.kernels]
    assert position["reduce3"] < position["gatherA2"] < position["back_1"], order
    assert position["rwait3"] < position["reduce2"] < position["back_1"], order
    assert position["reduce3"] == position["layout3"] + 1, order
