"""A predicted timeline of a program's collectives: how much communication
the schedule hid behind compute, for the report and the dump page.

The bandwidth model (docs/distributed.md), one figure per kernel:

- a collective of ``B`` bytes among ``n`` ranks, as a ring does it:
  all-reduce sends ``2 (n - 1) / n * B`` bytes in ``2 (n - 1)`` steps,
  all-gather (``B`` the gathered output) and reduce-scatter (``B`` the
  input) ``(n - 1) / n * B`` in ``n - 1`` steps, broadcast ``B`` in one;
  its time is ``wire bytes / LINK_BYTES + steps * LINK_LATENCY``;
- collectives share one link, in issue order (as NCCL's one stream does);
- any other kernel: the roofline of ``planning/offload.py`` (``flops /
  DEVICE_FLOPS + bytes read and written / DEVICE_BYTES``), views none;
- an issue costs no compute; a wait stalls the compute until its
  collective ends.

The figures are predictions of that model, never measurements; where the
group's size cannot be found (no process group), wire bytes and times are
``None``.
"""

from __future__ import annotations

from dataclasses import dataclass

from retrograd.ir import Kernel, Program
from retrograd.passes.planning import remat
from retrograd.passes.planning.collectives import PREFIX, is_issue, is_wait
from retrograd.passes.planning.offload import DEVICE_BYTES, DEVICE_FLOPS

__all__ = ["LINK_BYTES", "LINK_LATENCY", "Collective", "group_rank", "group_size",
           "kernel_seconds", "predict"]

#: bytes per second each rank sends on the ring (a PCIe 4 x16-class link; NVLink is faster)
LINK_BYTES = 25e9
#: seconds per ring step (message latency)
LINK_LATENCY = 10e-6
#: op -> (wire bytes as a fraction of the tensor's bytes, ring steps), for n ranks
_RING = {
    "all_reduce": lambda n: (2 * (n - 1) / n, 2 * (n - 1)),
    "all_gather_into_tensor": lambda n: ((n - 1) / n, n - 1),
    "reduce_scatter_tensor": lambda n: ((n - 1) / n, n - 1),
    "broadcast": lambda n: (1.0, 1),
}

def _group(kernel: Kernel):
    """The collective's process group (its last argument is the group's name),
    or None where no such group is initialised."""
    if not kernel.nodes:
        return None
    try:
        from torch.distributed.distributed_c10d import _resolve_process_group
        return _resolve_process_group(kernel.nodes[0].args[-1])
    except Exception:   # noqa: BLE001 - no process group, or not a group name
        return None


def group_rank(kernel: Kernel) -> int | None:
    """This process's rank in the collective's group, or None where no such
    group is initialised: each rank compiles (and reports) its own program."""
    group = _group(kernel)
    return None if group is None else group.rank()


def group_size(kernel: Kernel) -> int | None:
    """The number of ranks of the collective's group, or None where no such
    group is initialised."""
    group = _group(kernel)
    return None if group is None else group.size()


@dataclass
class Collective:
    """One collective as the model sees it (seconds from the step's start)."""

    op: str
    bytes: int
    ranks: int | None
    issued_at: int                  # kernel index of the issue
    waited_at: int | None = None    # kernel index of its wait
    kernels_between: int = 0        # compute kernels the schedule put between the two
    wire_bytes: int | None = None
    start: float | None = None
    end: float | None = None
    stall: float | None = None      # seconds the compute waited for it

    def row(self) -> dict:
        seconds = None if self.start is None else self.end - self.start
        return {"op": self.op, "bytes": self.bytes, "ranks": self.ranks,
                "wire_bytes": self.wire_bytes, "issued_at": self.issued_at,
                "waited_at": self.waited_at, "kernels_between": self.kernels_between,
                "start_seconds": self.start, "end_seconds": self.end,
                "seconds": seconds, "exposed_seconds": self.stall,
                "overlapped_seconds": None if seconds is None or self.stall is None
                else seconds - self.stall}


def kernel_seconds(program: Program, kernel: Kernel) -> float:
    """The roofline time of a compute kernel (views and collectives: none)."""
    if kernel.kind == "view" or is_issue(kernel) or is_wait(kernel):
        return 0.0
    moved = sum(program.buffers[n].logical_bytes for n in kernel.inputs + kernel.outputs
                if n in program.buffers)
    flops = sum(remat.flops(node) for node in kernel.nodes if hasattr(node, "op"))
    return flops / DEVICE_FLOPS + moved / DEVICE_BYTES


def _collective(program: Program, index: int, kernel: Kernel) -> Collective:
    nbytes = sum(program.buffers[n].logical_bytes for n in kernel.inputs[:1])
    op = kernel.op.removeprefix(PREFIX).rsplit(".", 1)[0]
    if op == "all_gather_into_tensor":   # the gathered bytes
        nbytes = sum(program.buffers[n].logical_bytes for n in kernel.outputs[:1])
    ranks = group_size(kernel)
    found = Collective(op, nbytes, ranks, index)
    if ranks is not None and op in _RING:
        fraction, _ = _RING[op](ranks)
        found.wire_bytes = round(fraction * nbytes)
    return found


def _seconds(collective: Collective) -> float | None:
    if collective.wire_bytes is None:
        return None
    _, steps = _RING[collective.op](collective.ranks)
    return collective.wire_bytes / LINK_BYTES + steps * LINK_LATENCY


def predict(program: Program) -> dict | None:
    """The predicted timeline's figures (module docstring), or None for a
    program without collectives: per collective its bytes, wire bytes,
    where it is issued and waited for, its predicted start and end and the
    seconds of it the compute did not hide; and the totals."""
    found: dict[str, Collective] = {}
    order: list[Collective] = []
    now = link_free = compute = 0.0
    known = True
    for index, kernel in enumerate(program.kernels):
        if is_issue(kernel):
            collective = _collective(program, index, kernel)
            seconds = _seconds(collective)
            known = known and seconds is not None
            if known:
                collective.start = max(now, link_free)
                collective.end = link_free = collective.start + seconds
            found.update({name: collective for name in kernel.outputs})
            order.append(collective)
        elif is_wait(kernel):
            collective = found.get(program.root(kernel.inputs[0])) if kernel.inputs else None
            if collective is None or collective.waited_at is not None:
                continue
            collective.waited_at = index
            if known:
                collective.stall = max(0.0, collective.end - now)
                now += collective.stall
        else:
            seconds = kernel_seconds(program, kernel)
            now, compute = now + seconds, compute + seconds
            for collective in order:
                if collective.waited_at is None and seconds:
                    collective.kernels_between += 1
    if not order:
        return None
    first = program.kernels[order[0].issued_at]
    return dict(_summary(order, compute, now, known), rank=group_rank(first))


def _summary(order: list[Collective], compute: float, step: float, known: bool) -> dict:
    """The totals; ``rank`` (added by ``predict``) says whose program these
    figures describe: every rank plans, schedules and reports its own."""
    rows = [collective.row() for collective in order]
    link = sum(row["seconds"] for row in rows) if known else None
    exposed = sum(row["exposed_seconds"] or 0.0 for row in rows) if known else None
    return {
        "collectives": rows,
        "count": len(rows),
        "bytes": sum(row["bytes"] for row in rows),
        "wire_bytes": sum(row["wire_bytes"] for row in rows) if known else None,
        "compute_seconds": compute,
        "communication_seconds": link,
        "exposed_seconds": exposed,
        "overlapped_seconds": None if link is None else link - exposed,
        "overlap_fraction": None if not link else (link - exposed) / link,
        "step_seconds": step if known else None,
        "step_seconds_waited_at_once": None if link is None else compute + link,
        "model": {"link_bytes_per_second": LINK_BYTES, "link_latency_seconds": LINK_LATENCY,
                  "device_flops": DEVICE_FLOPS, "device_bytes_per_second": DEVICE_BYTES},
    }
