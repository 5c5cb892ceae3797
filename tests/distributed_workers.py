"""Two-rank scenarios for tests/test_distributed.py, one process per rank
(compile_step's are in tests/distributed_step_workers.py).

``python tests/distributed_workers.py SCENARIO[:ARG] ...`` runs under torchrun's
environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; the test sets them),
on CPU with gloo. Each scenario trains a tiny model the retrograd way and the
eager way with the same wrapping, the same start and the same per-rank data,
and asserts gradients, parameters (and optimizer state) agree after several
steps; a failed assertion exits non-zero with the message on stderr.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import retrograd
from checks import assert_close_floor, recording_graphs

WIDTH, CLASSES, BATCH, STEPS = 8, 4, 4, 3
#: fp32 tolerance relative to the largest value (README: the zoo's 1e-4): reductions
#: summed in another order differ in the last bits, and AdamW's normalized steps carry
#: that into later gradients; a missing or doubled average is off by O(1)
FP32 = 1e-4


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.linear, self.norm = nn.Linear(width, width), nn.LayerNorm(width)

    def forward(self, x):
        return x + F.gelu(self.norm(self.linear(x)))


class Net(nn.Module):
    """Two blocks and a head: the blocks are FSDP2's units, the head its root."""

    def __init__(self, batch_norm: bool = False, width: int = WIDTH):
        super().__init__()
        self.inner = nn.Linear(WIDTH, width) if width != WIDTH else nn.Identity()
        self.blocks = nn.ModuleList([Block(width), Block(width)])
        self.head = nn.Linear(width, CLASSES)
        self.batch_norm = nn.BatchNorm1d(width) if batch_norm else nn.Identity()

    def forward(self, x):
        x = self.inner(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.batch_norm(x))


def loss_fn(model, x, y):
    return F.cross_entropy(model(x), y)


def batch(step: int):
    """This rank's batch of ``step``: different on every rank, as DDP's are."""
    generator = torch.Generator().manual_seed(100 * dist.get_rank() + step)
    return (torch.randn(BATCH, WIDTH, generator=generator),
            torch.randint(0, CLASSES, (BATCH,), generator=generator))


def twins(batch_norm: bool = False, width: int = WIDTH) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = Net(batch_norm, width)
    return model, copy.deepcopy(model)


def compare_grads(got: nn.Module, ref: nn.Module, what: str, tolerance: float = FP32) -> None:
    for (name, a), b in zip(got.named_parameters(), ref.parameters()):
        assert (a.grad is None) == (b.grad is None), f"{what}: {name}.grad None differs"
        if a.grad is not None:
            assert_close_floor(a.grad, b.grad, tolerance, 1e-3, f"{what}: {name}.grad")


def refused(call, *words) -> None:
    """``call()`` raises UnsupportedError whose message has all ``words``."""
    try:
        call()
    except retrograd.UnsupportedError as error:
        assert all(word in str(error) for word in words), (words, str(error))
    else:
        raise AssertionError(f"not refused: expected an error naming {words}")


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's shards) gathered whole; any other tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def compare_parameters(got: nn.Module, ref: nn.Module, what: str,
                       tolerance: float = FP32) -> None:
    for (name, a), b in zip(got.state_dict().items(), ref.state_dict().values()):
        a, b = _whole(a), _whole(b)
        if a.is_floating_point():
            assert_close_floor(a, b, tolerance, 1e-3, f"{what}: {name}")
        else:
            assert torch.equal(a, b), f"{what}: {name}"


def train_pair(pair, steps: int = STEPS, micro: int = 1) -> None:
    """``steps`` AdamW steps on both (model, optimizer) pairs; with ``micro`` > 1
    the first micro-batches accumulate under DDP's ``no_sync``. Gradients are
    compared before every update, parameters after the last."""
    for step in range(steps):
        for model, optimizer in pair:
            optimizer.zero_grad()
            for part in range(micro - 1):
                with model.no_sync():
                    loss_fn(model, *batch(step * micro + part)).backward()
            loss_fn(model, *batch(step * micro + micro - 1)).backward()
        compare_grads(pair[0][0], pair[1][0], f"step {step}")
        for _, optimizer in pair:
            optimizer.step()
    compare_parameters(pair[0][0], pair[1][0], f"after {steps} steps")


def ddp_torch_compile(executor: str) -> None:
    """DDP(torch.compile(model, backend="retrograd")) with no_sync accumulation,
    one graph (the default bucket holds every gradient)."""
    model, reference = twins()
    compiled = DDP(torch.compile(model, backend="retrograd", options={"executor": executor}))
    eager = DDP(reference)
    with recording_graphs() as graphs:
        train_pair([(compiled, torch.optim.AdamW(compiled.parameters(), lr=0.05)),
                    (eager, torch.optim.AdamW(eager.parameters(), lr=0.05))], micro=2)
    assert len(graphs) == 1, f"expected one graph, retrograd compiled {len(graphs)}"


def ddp_standalone(executor: str) -> None:
    """DDP(retrograd.compile(model)), the standalone face inside DDP, with
    no_sync accumulation, against eager DDP."""
    model, reference = twins()
    compiled = DDP(retrograd.compile(model, executor=executor))
    eager = DDP(reference)
    train_pair([(compiled, torch.optim.AdamW(compiled.parameters(), lr=0.05)),
                (eager, torch.optim.AdamW(eager.parameters(), lr=0.05))], micro=2)


def ddp_buckets(executor: str) -> None:
    """``bucket_cap_mb=1`` (DDPOptimizer's least: its first bucket is 1 MiB)
    and 512 x 512 weights (1 MiB each): dynamo's DDPOptimizer splits the graph
    at bucket boundaries, so retrograd compiles several graphs; same numbers."""
    model, reference = twins(width=512)
    cap = 1
    compiled = DDP(torch.compile(model, backend="retrograd", options={"executor": executor}),
                   bucket_cap_mb=cap)
    eager = DDP(reference, bucket_cap_mb=cap)
    with recording_graphs() as graphs:
        # SGD: Adam would turn last-bit differences of the wide layers' tiny
        # gradients into whole steps (it divides by their size)
        train_pair([(compiled, torch.optim.SGD(compiled.parameters(), lr=0.1, momentum=0.9)),
                    (eager, torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9))])
    assert len(graphs) > 1, f"DDPOptimizer did not split: {len(graphs)} graph(s)"


def fsdp2(reshard: str) -> None:
    """Each block compiled, then ``fully_shard`` per block and on the root,
    bf16 parameters with fp32 gradient reduction; against eager FSDP2 with
    the same policy."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model, reference = twins()
    for net, compile_blocks in ((model, True), (reference, False)):
        for block in net.blocks:
            if compile_blocks:
                block.compile(backend="retrograd", options={"executor": "fx"})
            fully_shard(block, mesh=mesh, mp_policy=policy,
                        reshard_after_forward=reshard == "reshard")
        fully_shard(net, mesh=mesh, mp_policy=policy)
    pair = [(net, torch.optim.AdamW(net.parameters(), lr=0.05)) for net in (model, reference)]
    with recording_graphs() as graphs:
        _fsdp2_steps(model, reference, pair)
    assert graphs, "retrograd compiled no graph under FSDP2"


def _fsdp2_steps(model, reference, pair) -> None:
    """Gradients (gathered whole) before every update, parameters after the last."""
    for step in range(STEPS):
        for net, optimizer in pair:
            optimizer.zero_grad()
            loss_fn(net, *batch(step)).backward()
        for (name, a), b in zip(model.named_parameters(), reference.parameters()):
            assert_close_floor(a.grad.full_tensor(), b.grad.full_tensor(), 2e-2, 1e-3,
                               f"step {step}: {name}.grad")
        for _, optimizer in pair:
            optimizer.step()
    compare_parameters(model, reference, f"after {STEPS} steps", tolerance=2e-2)


SCENARIOS = {function.__name__: function for function in (
    ddp_torch_compile, ddp_standalone, ddp_buckets, fsdp2)}


def main() -> None:
    """Run each ``SCENARIO[:ARG]`` of the command line in order, in one process
    group (starting a process costs more than most scenarios)."""
    import distributed_step_workers  # compile_step's scenarios (they import this module)

    SCENARIOS.update(distributed_step_workers.SCENARIOS)
    dist.init_process_group("gloo")
    try:
        for item in sys.argv[1:]:
            name, _, argument = item.partition(":")
            print(f"rank {dist.get_rank()}: {name} {argument}", flush=True)
            torch._dynamo.reset()
            SCENARIOS[name](argument)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
