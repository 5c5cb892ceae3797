"""compile_step's two-rank scenarios for tests/test_distributed.py (DDP,
``process_group=``, buckets, ZeRO-1, the refusals), run by
tests/distributed_workers.py, whose model, data and comparisons they share:
each trains the retrograd way and the eager way from the same start and
asserts they agree; a failed assertion exits non-zero.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import retrograd
from checks import assert_close, assert_close_floor
from distributed_workers import (BATCH, CLASSES, FP32, STEPS, WIDTH, Net, batch,
                                 compare_parameters, loss_fn, refused, twins)


#: DDP's bucket_cap_mb for the bucketed scenarios: 256 bytes, so Net's twelve
#: parameters (912 bytes with BatchNorm) fill four buckets
SMALL_BUCKET_MB = 256 / 2 ** 20


def compile_step_ddp(executor: str) -> None:
    """retrograd.compile_step(DDP(model)) against an eager DDP loop: AdamW,
    BatchNorm buffers (broadcast from rank 0), gradient clipping; parameters,
    buffers and optimizer state after several steps. DDP's 256-byte buckets:
    one all-reduce per bucket, each issued before the backward's end. Under
    "auto", the dump's trace.json shows each all-reduce on its own track."""
    model, reference = twins(batch_norm=True)
    wrapped = DDP(model, bucket_cap_mb=SMALL_BUCKET_MB)
    eager = DDP(reference, bucket_cap_mb=SMALL_BUCKET_MB)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=0.05)
    eager_optimizer = torch.optim.AdamW(eager.parameters(), lr=0.05)
    folder = tempfile.mkdtemp(prefix=f"rg-ddp-dump-{dist.get_rank()}-")
    step = retrograd.compile_step(wrapped, loss_fn, optimizer, max_grad_norm=0.5,
                                  executor=executor,
                                  dump_dir=folder if executor == "auto" else None)
    _train_against(step, model, optimizer, eager, reference, eager_optimizer, clip=0.5)
    check_buckets(step, model)
    if executor == "auto":   # one dump is enough: the trace's collectives track
        check_trace(folder, step.reports["step"]["communication"])
    shutil.rmtree(folder)


def check_trace(folder: str, communication: dict) -> None:
    """The dump's trace.json has the collectives on their own track: one
    span per all-reduce, from its issue to its wait, bytes as reported."""
    [path] = Path(folder).glob("*-step/trace.json")
    events = json.loads(path.read_text())["traceEvents"]
    spans = [e for e in events if e.get("cat") == "collective"]
    rows = communication["collectives"]
    assert [e["args"]["bytes"] for e in spans] == [row["bytes"] for row in rows], spans
    assert all(e["args"]["op"] == "all_reduce" and e["dur"] > 0 for e in spans), spans


def compile_step_group(executor: str) -> None:
    """compile_step(model, process_group=WORLD, bucket_cap_mb=...) without a
    DDP wrapper, each rank's model built from its own seed: rank 0's
    parameters are copied to every rank when the step is built, and the
    steps equal an eager DDP loop (which copies them when it wraps)."""
    torch.manual_seed(dist.get_rank())
    model = Net(batch_norm=True)
    eager_model = copy.deepcopy(model)
    eager = DDP(eager_model, bucket_cap_mb=SMALL_BUCKET_MB)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    eager_optimizer = torch.optim.AdamW(eager.parameters(), lr=0.05)
    step = retrograd.compile_step(model, loss_fn, optimizer, executor=executor,
                                  process_group=dist.group.WORLD,
                                  bucket_cap_mb=SMALL_BUCKET_MB)
    _train_against(step, model, optimizer, eager, eager_model, eager_optimizer, clip=None)
    check_buckets(step, model)


def compile_step_budget(executor: str) -> None:
    """memory_budget and the arena per rank: each rank builds its own step
    program, so a rank may pass its own budget (0.3 on rank 0, 0.6 on rank
    1). Each rank's checkpoint plan obeys its own budget (saved bytes <=
    budget bytes < save-all bytes, the budget ``fraction * save-all``), its
    report says whose figures they are (``communication["rank"]``), the
    ranks' figures differ as their budgets do, and the steps still equal an
    eager DDP loop (the collectives do not depend on the plan)."""
    fraction = (0.3, 0.6)[dist.get_rank()]
    model, reference = twins(width=16)
    wrapped, eager = DDP(model), DDP(reference)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    eager_optimizer = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9)
    step = retrograd.compile_step(wrapped, loss_fn, optimizer, executor=executor,
                                  memory_budget=fraction)
    _train_against(step, model, optimizer, eager, reference, eager_optimizer, clip=None)
    report = step.reports["step"]
    stats = next(p["stats"] for p in report["passes"] if p["name"] == "checkpoint")
    assert stats["plan"] == f"memory_budget={fraction}", stats["plan"]
    assert abs(stats["budget_bytes"] - fraction * stats["save_all_bytes"]) <= 1, stats
    assert stats["saved_activation_bytes"] <= stats["budget_bytes"] < stats["save_all_bytes"]
    assert report["communication"]["rank"] == dist.get_rank(), report["communication"]
    mine = (stats["budget_bytes"], stats["saved_activation_bytes"],
            report["memory"]["arena_bytes"])
    assert all(isinstance(value, (int, float)) and value > 0 for value in mine), mine
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    assert everyone[0][0] < everyone[1][0], everyone   # each rank's own budget
    assert everyone[0][1] < everyone[1][1], everyone   # and its own plan


class Gated(Net):
    """``Net`` plus an ``extra`` layer used only on even batch sizes: the
    signatures' losses reach different parameters."""

    def __init__(self):
        super().__init__(batch_norm=True)
        self.extra = nn.Linear(WIDTH, CLASSES)

    def forward(self, x):
        logits = super().forward(x)
        return logits + self.extra(x) if x.shape[0] % 2 == 0 else logits


def compile_step_zero(kind: str) -> None:
    """ZeRO-1: compile_step(DDP(model), shard_optimizer_state=True), AdamW
    (``kind`` "adamw", with gradient clipping and DDP's 256-byte buckets, so
    some buckets hold only one rank's parameters) or SGD with momentum
    ("sgd"), the CPU default. Parameters and buffers equal an eager DDP loop
    after several steps; each rank keeps optimizer state for its own
    parameters only (equal to eager's), together every parameter's. The
    gradients are reduce-scattered (one per bucket, no all-reduce of
    gradients) and the updates all-gathered, the bytes counted as sent.
    "sgd" alternates batch sizes whose losses reach different parameters:
    each keeps its owner and state across them."""
    torch.manual_seed(0)
    model = Gated() if kind == "sgd" else Net(batch_norm=True)
    reference = copy.deepcopy(model)
    cap = SMALL_BUCKET_MB if kind == "adamw" else 25
    wrapped = DDP(model, bucket_cap_mb=cap)
    eager = DDP(reference, find_unused_parameters=kind == "sgd", bucket_cap_mb=cap)
    rows = [BATCH, BATCH - 1, BATCH, BATCH - 1] if kind == "sgd" else [BATCH] * STEPS
    clip = 0.5 if kind == "adamw" else None

    def make(parameters):
        if kind == "sgd":
            return torch.optim.SGD(parameters, lr=0.1, momentum=0.9)
        return torch.optim.AdamW(parameters, lr=0.05)
    optimizer, eager_optimizer = make(wrapped.parameters()), make(eager.parameters())
    step = retrograd.compile_step(wrapped, loss_fn, optimizer, shard_optimizer_state=True,
                                  max_grad_norm=clip)
    for number, count in enumerate(rows):
        x, y = batch(number)
        loss = step(x[:count], y[:count])
        eager_optimizer.zero_grad()
        eager_loss = loss_fn(eager, x[:count], y[:count])
        eager_loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(eager.parameters(), clip)
        eager_optimizer.step()
        assert_close(loss.detach(), eager_loss.detach(), torch.float32, f"loss {number}")
    compare_parameters(model, reference, f"after {STEPS} steps")
    _check_sharded_state(model, reference, optimizer, eager_optimizer)
    if kind == "adamw":
        _check_zero_collectives(step, model)


def _check_sharded_state(model, reference, optimizer, eager_optimizer) -> None:
    """Each rank keeps state (equal to eager's) for its own parameters only;
    together, every parameter's."""
    mine = []
    for index, (p, q) in enumerate(zip(model.parameters(), reference.parameters())):
        if optimizer.state[p]:
            mine.append(index)
            for key, value in eager_optimizer.state[q].items():
                assert_close_floor(optimizer.state[p][key], value, FP32, 1e-3, f"state {key}")
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    assert all(everyone), f"a rank keeps no state: {everyone}"
    count = len(list(model.parameters()))
    assert sorted(i for part in everyone for i in part) == list(range(count)), everyone


def _check_zero_collectives(step, model) -> None:
    """One reduce-scatter per DDP bucket, one all-gather (float32), one
    one-element all-reduce (the clip's norm); the report's bytes are the
    padded layouts actually sent, each below an all-reduce's wire bytes."""
    from retrograd.buckets import Limits, assign
    from retrograd.zero import owners
    parameters = list(model.parameters())
    sizes = [p.numel() for p in parameters]
    owner = owners(sizes, 2)
    buckets = assign([(n * 4, torch.float32) for n in sizes], Limits(256, 256))
    assert any(len({owner[i] for i in bucket}) == 1 for bucket in buckets), buckets
    ops = step.reports["step"]["kernels"]["extern_ops"]
    assert ops.get("_c10d_functional.reduce_scatter_tensor.default") == len(buckets), ops
    assert ops.get("_c10d_functional.all_gather_into_tensor.default") == 1, ops
    assert ops.get("_c10d_functional.all_reduce.default") == 1, ops
    assert "_c10d_functional.broadcast.default" not in ops, ops

    def padded(part_sizes):   # two ranks' chunks, each the larger one's width
        return 2 * 4 * max(part_sizes)
    scattered = sum(padded([sum(sizes[i] for i in b if owner[i] == r) for r in (0, 1)])
                    for b in buckets)
    gathered = padded([sum(n for n, o in zip(sizes, owner) if o == r) for r in (0, 1)])
    communication = step.reports["step"]["communication"]
    rows = communication["collectives"]
    by_op = {op: sum(row["bytes"] for row in rows if row["op"] == op)
             for op in ("reduce_scatter_tensor", "all_gather_into_tensor", "all_reduce")}
    assert by_op == {"reduce_scatter_tensor": scattered, "all_gather_into_tensor": gathered,
                     "all_reduce": 4}, (by_op, scattered, gathered)
    wire = sum(row["wire_bytes"] for row in rows if row["op"] == "reduce_scatter_tensor")
    assert wire == scattered // 2 < 4 * sum(sizes), (wire, sizes)


def check_buckets(step, model) -> None:
    """One all-reduce per 256-byte bucket, as many as DDP's own assignment
    makes, and the schedule put compute between the first bucket's issue
    and its wait."""
    parameters = list(model.parameters())
    expected = len(dist._compute_bucket_assignment_by_size(
        parameters, [256], [False] * len(parameters))[0])
    assert expected > 2, expected
    report = step.reports["step"]
    assert report["kernels"]["extern_ops"].get("_c10d_functional.all_reduce.default") == \
        expected, report["kernels"]["extern_ops"]
    schedule = next(p for p in report["passes"] if p["name"] == "schedule")["stats"]
    rows = schedule["communication"]["collectives"]
    assert [row["issued_at"] for row in rows] == sorted(row["issued_at"] for row in rows)
    assert rows[0]["kernels_between"] > 0 and rows[0]["waited_at"] > rows[-1]["issued_at"], rows


def _train_against(step, model, optimizer, eager, reference, eager_optimizer, clip) -> None:
    """``STEPS`` compiled steps against an eager DDP loop: losses, then
    parameters, buffers and optimizer state after the last."""
    for number in range(STEPS):
        loss = step(*batch(number))
        eager_optimizer.zero_grad()
        eager_loss = loss_fn(eager, *batch(number))
        eager_loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(eager.parameters(), clip)
        eager_optimizer.step()
        assert_close(loss.detach(), eager_loss.detach(), torch.float32, f"loss {number}")
    compare_parameters(model, reference, f"after {STEPS} steps")
    for p, q in zip(model.parameters(), reference.parameters()):
        for key, value in eager_optimizer.state[q].items():
            assert_close_floor(optimizer.state[p][key], value, FP32, 1e-3, f"state {key}")


class Partial(Net):
    """``Net`` plus an ``extra`` layer that only a rank with ``use_extra`` uses."""

    def __init__(self, use_extra: bool):
        super().__init__()
        self.extra, self.use_extra = nn.Linear(WIDTH, CLASSES), use_extra

    def forward(self, x):
        logits = super().forward(x)
        return logits + self.extra(x) if self.use_extra else logits


def compile_step_unused(executor: str) -> None:
    """A layer the loss reaches on rank 1 only: averaged on both ranks, as
    DDP(find_unused_parameters=True); SGD with momentum."""
    torch.manual_seed(0)
    model = Partial(use_extra=dist.get_rank() == 1)
    reference = copy.deepcopy(model)
    wrapped, eager = DDP(model), DDP(reference, find_unused_parameters=True)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    eager_optimizer = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9)
    step = retrograd.compile_step(wrapped, loss_fn, optimizer, executor=executor)
    start = model.extra.weight.detach().clone()
    for number in range(STEPS):
        step(*batch(number))
        eager_optimizer.zero_grad()
        loss_fn(eager, *batch(number)).backward()
        eager_optimizer.step()
    compare_parameters(model, reference, f"after {STEPS} steps")
    moved = (model.extra.weight - start).abs().max()
    assert moved > 0, "the extra layer was not updated on this rank"


class Mixed(nn.Module):
    """A float64 layer feeding a float32 one: two gradient dtypes, two all-reduces."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(WIDTH, WIDTH, dtype=torch.float64)
        self.second = nn.Linear(WIDTH, CLASSES)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x.double())).float())


def compile_step_dtypes(executor: str) -> None:
    """Gradients of two dtypes: one all-reduce each, the second ordered after
    the first; parameters equal an eager DDP loop (SGD with momentum)."""
    torch.manual_seed(0)
    model = Mixed()
    reference = copy.deepcopy(model)
    wrapped, eager = DDP(model), DDP(reference)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    eager_optimizer = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9)
    step = retrograd.compile_step(wrapped, loss_fn, optimizer, executor=executor)
    for number in range(STEPS):
        step(*batch(number))
        eager_optimizer.zero_grad()
        loss_fn(eager, *batch(number)).backward()
        eager_optimizer.step()
    compare_parameters(model, reference, f"after {STEPS} steps")
    report = step.reports["step"]["kernels"]["extern_ops"]
    assert report.get("_c10d_functional.all_reduce.default") == 2, report


def refusals(_: str) -> None:
    """Setups compile_step cannot run end in UnsupportedError naming the fix
    (FSDP1 needs an accelerator to be built: tests/test_distributed.py)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def build(model):
        return lambda: retrograd.compile_step(model, loss_fn, None)

    model = Net()
    inner = copy.deepcopy(model)
    fully_shard(inner.blocks[0], mesh=init_device_mesh("cpu", (2,)))
    refused(build(inner), "FSDP2", "fully_shard on the root too")
    uneven = DDP(copy.deepcopy(model))
    if dist.get_rank() == 1:   # changed after DDP checked the shapes
        uneven.module.head = nn.Linear(WIDTH, CLASSES + 1)
    refused(build(uneven), "differ across ranks", "head.weight")
    wrapped = DDP(copy.deepcopy(model))
    step = retrograd.compile_step(wrapped, loss_fn, None, executor="fx")
    with wrapped.no_sync():
        refused(lambda: step(*batch(0)), "no_sync", "DDP(torch.compile")
    refused(lambda: retrograd.compile_step(model, loss_fn, None, process_group="WORLD"),
            "must be a torch.distributed.ProcessGroup", "str")
    late = DDP(copy.deepcopy(model))
    dist.destroy_process_group()
    refused(build(late), "no process group", "init_process_group")


SCENARIOS = {function.__name__: function for function in (
    compile_step_ddp, compile_step_group, compile_step_zero, compile_step_budget,
    compile_step_unused, compile_step_dtypes, refusals)}


def _fsdp2_scenarios() -> dict:
    import distributed_fsdp_workers   # compile_step on FSDP2 (it imports distributed_workers)
    return distributed_fsdp_workers.SCENARIOS


SCENARIOS.update(_fsdp2_scenarios())
