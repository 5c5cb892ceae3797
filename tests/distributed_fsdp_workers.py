"""compile_step on an FSDP2 model: two-rank scenarios for
tests/test_distributed.py (run by tests/distributed_workers.py, whose model,
data and comparisons they share). The model is 5 wide, so FSDP2's dim-0
shards are uneven (3 rows on rank 0, 2 on rank 1) and the step's padding
is exercised."""

from __future__ import annotations

import copy
import functools
from itertools import pairwise

import retrograd
import torch
import torch.distributed as dist
from checks import assert_close, assert_close_floor
from distributed_workers import (
    CLASSES,
    FP32,
    STEPS,
    WIDTH,
    Block,
    batch,
    compare_parameters,
    loss_fn,
    refused,
    twins,
)
from torch import nn


def _sharded(net, reshard: bool = True, policy=None):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    policy = policy or MixedPrecisionPolicy()
    for block in net.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    return fully_shard(net, mesh=mesh, mp_policy=policy)


def compile_step_fsdp2(argument: str) -> None:
    """compile_step(fully_shard(model)) against an eager FSDP2 loop with the
    same wrapping: AdamW with clipping, three steps; losses, parameters
    (gathered whole), BatchNorm's running statistics (each rank's own: FSDP2
    does not broadcast buffers) and each rank's optimizer state (its shards, equal to
    eager FSDP2's local state). ``argument``: the executor, then ``/keep``
    for blocks sharded with ``reshard_after_forward=False`` (or
    ``/reshard``), then ``/`` and a ``memory_budget``. The program
    all-gathers each unit's shards (3 units: root, two blocks), each block's
    once more for its backward when it reshards (the root, left at FSDP2's
    default, keeps its parameters), and reduce-scatters each unit's
    gradients."""
    executor, mode, budget = (argument.split("/") + ["", ""])[:3]
    reshard = mode != "keep"
    model, reference = twins(batch_norm=True, width=5)
    model, reference = _sharded(model, reshard), _sharded(reference, reshard)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    eager_optimizer = torch.optim.AdamW(reference.parameters(), lr=0.05)
    step = retrograd.compile_step(model, loss_fn, optimizer, max_grad_norm=0.5,
                                  executor=executor,
                                  memory_budget=float(budget) if budget else None)
    for number in range(STEPS):
        loss = step(*batch(number))
        eager_optimizer.zero_grad()
        eager_loss = loss_fn(reference, *batch(number))
        eager_loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        eager_optimizer.step()
        assert_close(loss.detach(), eager_loss.detach(), torch.float32, f"loss {number}")
    compare_parameters(model, reference, f"after {STEPS} steps")
    mine = [p for group in optimizer.param_groups for p in group["params"]]
    theirs = [p for group in eager_optimizer.param_groups for p in group["params"]]
    assert len(mine) == len(theirs) == len(list(model.parameters()))
    for p, q in zip(mine, theirs):
        assert p.shape == q.to_local().shape, (p.shape, q.to_local().shape)
        for key, value in eager_optimizer.state[q].items():
            value = value.to_local() if hasattr(value, "to_local") else value
            assert_close_floor(optimizer.state[p][key], value, FP32, 1e-3, f"state {key}")
    ops = step.reports["step"]["kernels"]["extern_ops"]
    gathers = 1 + 2 * (2 if reshard else 1)
    assert ops.get("_c10d_functional.all_gather_into_tensor.default") == gathers, ops
    assert ops.get("_c10d_functional.reduce_scatter_tensor.default") == 3, ops


def compile_step_fsdp2_mixed(reduce: str) -> None:
    """compile_step on FSDP2 with ``MixedPrecisionPolicy(param_dtype=bf16,
    reduce_dtype=...)`` (``reduce``: ``fp32``, or ``none`` for param_dtype
    alone: gradients reduced in bf16) against an eager FSDP2 loop with the
    same policy: SGD with momentum, three steps. The fp32 master weights (the
    shards) and the optimizer state stay fp32; the loss is bf16 as eager's;
    the program's all-gathers move bf16 (half a plain step's bytes) and its
    reduce-scatters fp32 or bf16 (_check_mixed_bytes).

    Tolerance (MIXED, relative to each parameter's largest value): bf16
    keeps 8 significant bits, so values one rounding apart differ by up to
    2**-7 (0.8 %) relative; retrograd's fused kernels round bf16
    intermediates at other points than eager's op-by-op kernels do (as two
    eager runs whose bf16 reductions are summed in another order differ),
    and the gradients carry that into the parameters. Seen: losses equal or
    one bf16 ulp apart, parameters within 0.55 % after three steps; 2e-2 is
    about 2.5 ulps, the per-block bf16 test's tolerance (distributed_workers
    fsdp2). AdamW is not used here: its normalized step turns a last-bit
    difference of a near-zero gradient into a whole ``lr`` (3.4 % seen). A
    missing average, cast or unit is off by O(1); computing in fp32 would
    be within the tolerance, which is why dtypes and bytes are checked
    exactly."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                  reduce_dtype=torch.float32 if reduce == "fp32" else None)
    model, reference = twins(width=5)
    model, reference = (_sharded(net, policy=policy) for net in (model, reference))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    eager_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    step = retrograd.compile_step(model, loss_fn, optimizer, executor="fx")
    for number in range(STEPS):
        loss = step(*batch(number))
        eager_optimizer.zero_grad()
        eager_loss = loss_fn(reference, *batch(number))
        eager_loss.backward()
        eager_optimizer.step()
        assert loss.dtype == eager_loss.dtype == torch.bfloat16, (loss.dtype, eager_loss.dtype)
        assert_close(loss.detach(), eager_loss.detach(), torch.bfloat16, f"loss {number}", MIXED)
    compare_parameters(model, reference, f"after {STEPS} steps", tolerance=MIXED)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    _check_mixed_state(optimizer, eager_optimizer)
    _check_mixed_bytes(step, reduce)


MIXED = 2e-2


def _check_mixed_state(optimizer, eager_optimizer) -> None:
    """Each shard and its momentum buffer fp32, the buffer eager FSDP2's."""
    mine = [p for group in optimizer.param_groups for p in group["params"]]
    theirs = [p for group in eager_optimizer.param_groups for p in group["params"]]
    eager = [eager_optimizer.state[q]["momentum_buffer"].to_local() for q in theirs]
    # bf16 gradients are sums of terms each rounded to 2**-8 of its size: a
    # small entry's error scales with the largest gradients (the floor), not itself
    floor = max(buffer.abs().max().item() for buffer in eager)
    for p, buffer, reference_buffer in zip(mine, (optimizer.state[p]["momentum_buffer"]
                                                  for p in mine), eager, strict=True):
        assert p.dtype == buffer.dtype == torch.float32, (p.dtype, buffer.dtype)
        assert_close_floor(buffer, reference_buffer, MIXED, floor, "momentum_buffer")


def _check_mixed_bytes(step, reduce: str) -> None:
    """The mixed step's collectives against a plain (fp32) step's on the same
    model: all-gathers half the bytes, reduce-scatters the same (fp32
    reduction) or half (bf16)."""
    plain = _plain_bytes()
    for op, ratio in (("all_gather_into_tensor", 2), ("reduce_scatter_tensor",
                                                        1 if reduce == "fp32" else 2)):
        assert plain[op] == ratio * _bytes(step, op) > 0, (op, plain[op], _bytes(step, op))


@functools.cache
def _plain_bytes() -> dict[str, int]:
    """Bytes per collective kind of a plain (no policy) step on the model."""
    plain = _sharded(twins(width=5)[0])
    step = retrograd.compile_step(plain, loss_fn, _sgd(plain), executor="fx")
    step(*batch(0))
    return {op: _bytes(step, op) for op in ("all_gather_into_tensor", "reduce_scatter_tensor")}


def _bytes(step, op: str) -> int:
    return sum(row["bytes"] for row in step.reports["step"]["communication"]["collectives"]
               if row["op"] == op)


def fsdp2_reshard_plan(_: str) -> None:
    """What ``reshard_after_forward`` changes in the step program (one step
    each, the CPU default): with it, each block's gathered parameters are
    recomputed for the backward, never saved (the ledger says why), so each
    block is all-gathered twice and the predicted peak and saved bytes fall
    below the same model's without it, also under a memory budget (the mark
    holds whatever a rank's budget); the scheduled program's peak falls too
    (it was 2,120 bytes against 1,940: a lazy re-gather wait was pulled
    forward by the next unit's issue, so two blocks' re-gathers were alive at
    the loss, and the gathers' flattened shards were made at the program's
    start; docs/distributed.md).
    Prefetch one unit ahead, no earlier: each all-gather is issued after the
    previous one's wait, with compute kernels under it (the blocks' forward
    gathers, and the first block's re-gather under the second block's
    backward)."""
    found = {}
    for name, reshard, budget in (("keep", False, None), ("reshard", True, None),
                                  ("budget", True, 0.3)):
        model, _ = twins(batch_norm=True, width=5)
        model = _sharded(model, reshard)
        step = retrograd.compile_step(model, loss_fn, _sgd(model), memory_budget=budget)
        step(*batch(0))
        found[name] = report = step.reports["step"]
        gathers = [row for row in report["communication"]["collectives"]
                   if row["op"] == "all_gather_into_tensor"]
        assert len(gathers) == (5 if reshard else 3), gathers
        for before, after in pairwise(gathers):
            assert after["issued_at"] > before["waited_at"], (name, before, after)
        assert all(row["kernels_between"] > 0 for row in gathers[1:3]), (name, gathers)
        if reshard:   # the first block's re-gather runs under the second's backward
            assert gathers[4]["kernels_between"] > 0, (name, gathers)
        reasons = {row["reason"] for row in report["ledger"] if row["decision"] == "recomputed"}
        assert any("reshard_after_forward" in reason for reason in reasons) == reshard, reasons
        assert not any("reshard_after_forward" in row["reason"] for row in report["ledger"]
                       if row["decision"] == "saved"), report["ledger"]
    keep, reshard = found["keep"]["memory"], found["reshard"]["memory"]
    assert reshard["predicted_peak_bytes"] < keep["predicted_peak_bytes"], (reshard, keep)
    assert reshard["saved_activation_bytes"] < keep["saved_activation_bytes"], (reshard, keep)
    assert reshard["program_peak_bytes"] < keep["program_peak_bytes"], (reshard, keep)
    budget = found["budget"]["memory"]
    assert budget["saved_activation_bytes"] <= reshard["saved_activation_bytes"], budget


class Deep(nn.Module):
    """Five 32-wide blocks and a head: each block's weight (4 KiB) is eight
    times its activations (4 rows), so holding every block's gathered
    parameters through the backward (no resharding) costs more than two
    blocks' re-gathered ones at a time; the plan predicts resharding lower."""

    def __init__(self, width: int = 32, blocks: int = 5):
        super().__init__()
        self.inner = nn.Linear(WIDTH, width)
        self.blocks = nn.ModuleList([Block(width) for _ in range(blocks)])
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x):
        x = self.inner(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def fsdp2_reshard_peak_deep(_: str) -> None:
    """On ``Deep`` (SGD, two steps each), the scheduled program's peak with
    ``reshard_after_forward`` is below the one without, as the plan's
    predicted peak is (29,464 vs 31,416 bytes). It was above (41,044 vs
    32,336 bytes at f7c0c90): every reduce-scatter was issued
    after the last re-gather and each one's wait placed at the backward's
    end, so the units' full gradients were alive together there, and the
    arena windows could not be cut around the backward's fullest point. The
    losses and parameters still equal an eager FSDP2 loop's."""
    peaks = {}
    for reshard in (True, False):
        torch.manual_seed(0)
        model = Deep()
        reference = copy.deepcopy(model)
        model, reference = _sharded(model, reshard), _sharded(reference, reshard)
        step = retrograd.compile_step(model, loss_fn, _sgd(model))
        eager = _sgd(reference)
        for number in range(2):
            loss = step(*batch(number))
            eager.zero_grad()
            eager_loss = loss_fn(reference, *batch(number))
            eager_loss.backward()
            eager.step()
            assert_close(loss.detach(), eager_loss.detach(), torch.float32, f"loss {number}")
        compare_parameters(model, reference, f"reshard={reshard}")
        memory = step.reports["step"]["memory"]
        peaks[reshard] = (memory["program_peak_bytes"], memory["predicted_peak_bytes"])
    assert peaks[True][1] < peaks[False][1], peaks   # the model is one where it should be
    assert peaks[True][0] < peaks[False][0], peaks
    if dist.get_rank() == 0:
        print("program and predicted peaks (reshard, keep):", peaks[True], peaks[False])


def fsdp2_refusals(_: str) -> None:
    """FSDP2 setups the step cannot run end in UnsupportedError naming the
    fix: blocks sharded without the root, the parts of FSDP2's
    MixedPrecisionPolicy the step does not mirror (float16, output_dtype,
    cast_forward_inputs=False, reduce_dtype alone), no
    optimizer, a model that differs across ranks (its all-gathers would not
    match: a hang or a gloo error before), and no process group (run last:
    it destroys the group)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    blocks_only, _ = twins()
    for block in blocks_only.blocks:
        fully_shard(block, mesh=mesh)
    refused(lambda: retrograd.compile_step(blocks_only, loss_fn, None),
             "fully_shard on the root too")
    for options, named in (({"param_dtype": torch.float16}, "param_dtype=torch.float16"),
                           ({"param_dtype": torch.bfloat16, "output_dtype": torch.float32},
                            "output_dtype=torch.float32"),
                           ({"param_dtype": torch.bfloat16, "cast_forward_inputs": False},
                            "cast_forward_inputs=False"),
                           ({"reduce_dtype": torch.bfloat16},
                            "reduce_dtype=torch.bfloat16 without param_dtype")):
        mixed = _sharded(twins()[0], policy=MixedPrecisionPolicy(**options))
        refused(lambda mixed=mixed: retrograd.compile_step(mixed, loss_fn, _sgd(mixed)),
                "MixedPrecisionPolicy(" + named + ")", "torch.autocast")
    plain = _sharded(twins()[0])
    refused(lambda: retrograd.compile_step(plain, loss_fn, None), "needs an optimizer")
    uneven = twins()[0]
    if dist.get_rank() == 1:   # a model that differs by rank: its gathers would not match
        uneven.head = nn.Linear(WIDTH, CLASSES + 1)
    uneven = _sharded(uneven)
    refused(lambda: retrograd.compile_step(uneven, loss_fn, _sgd(uneven)),
            "FSDP2 model's parameters differ across ranks", "head.weight")
    late = _sharded(twins()[0])
    dist.destroy_process_group()   # the last check: nothing communicates after it
    refused(lambda: retrograd.compile_step(late, loss_fn, _sgd(late)),
            "FSDP2", "no process group is initialised", "init_process_group")


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)


SCENARIOS = {function.__name__: function for function in (
    compile_step_fsdp2, compile_step_fsdp2_mixed, fsdp2_reshard_plan, fsdp2_reshard_peak_deep, fsdp2_refusals)}
