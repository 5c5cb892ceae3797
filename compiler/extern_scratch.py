"""The scratch of an extern call: what an aten call allocates beyond its
results while it runs, for the memory timeline (``memory_timeline.py``).

Measured, not modelled. oneDNN's convolutions on CPU copy the weight (and
their result, for a blocked layout) into a layout padded to 8 or 16
channels and take a scratchpad whose size follows the implementation oneDNN
picks for the CPU's instruction set and torch's thread count. On the zoo's
CNN (2x4x4x4 channels-last input, a 3x3 weight) the second convolution's
forward allocated 15,216 bytes beyond its 512-byte result: a contiguous copy
of the weight (576), the weight padded to 16 output channels (2,304) and a
12,336-byte scratchpad; the first convolution's backward took 25,600 (torch
2.13, this project's CPU, profiled with torch's profiler). No formula
written here would hold on another CPU, so the figure comes from calling the
op once on tensors of the program's shapes, strides and dtypes, before the
program runs, in the process that will run it.

How: torch's autograd profiler in its legacy mode (``profile_memory=True``;
no kineto start-up and nothing printed), its ``memory_alloc`` records in time
order; the scratch is the peak of their running sum minus what the call
leaves allocated (its results, which the timeline counts as the program's
own storages from this kernel on). So the timeline holds, at the call, what
was alive before it plus the call's own peak. Probes are cached per
signature (op, operands' shapes/strides/dtypes, other arguments, thread
count) for the life of the process.

Where no probe is made the timeline keeps the planner's estimate (bytes read
plus written, ``planning/windows.py``) and says "estimate": a device other
than the CPU (the profiler's CPU records do not see device memory), a call
reading and writing more than ``PROBE_LIMIT_BYTES`` (the probe would cost a
real call of that size at compile time), an op outside the ``aten``
namespace (retrograd's own ops, such as the chunked linear + cross-entropy,
may draw random numbers), an operand without recorded metadata, a torch
profiler already running (one at a time), or a dispatch mode active (a fake
tensor mode would make the probe's tensors fake). Under the CPU default the
zoo CNN's program peak then equals its measured peak (tests/test_report_peaks.py),
its step program's too (30,740 bytes on this project's CPU, two threads);
under the interpreter the backward's measured peak is 1.02x (29,364 against
28,852: staging tensors the timeline does not count).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from retrograd.ir import Kernel, Program
from retrograd.passes.op_classes import SCRATCH_OPS
from torch import fx
from torch.autograd import profiler_legacy
from torch.utils import _python_dispatch

__all__ = ["PROBE_LIMIT_BYTES", "Scratch", "node_scratch", "scratch"]

#: largest call (bytes read + written) probed at compile time
PROBE_LIMIT_BYTES = 64 << 20

MEASURED = "extern scratch (measured: one probe call of the same signature)"
ESTIMATE = "extern scratch (estimate: bytes read + written; {why})"

_PROBED: dict[tuple, int] = {}


@dataclass(frozen=True)
class Scratch:
    """Bytes of scratch at one extern call and how the figure was found."""

    nbytes: int
    what: str


@dataclass(frozen=True)
class _Slot:
    """Where an operand goes in the probe's arguments (its node's name)."""

    name: str


class _NoProbe(Exception):
    """Why this call is not probed (the estimate's note)."""


def scratch(program: Program, kernel: Kernel) -> Scratch:
    """The scratch of ``kernel`` (an extern call): probed where possible,
    else the estimate, labelled with the reason (module docstring)."""
    estimate = sum(program.buffers[n].nbytes for n in kernel.inputs + kernel.outputs
                   if n in program.buffers)
    try:
        if estimate > PROBE_LIMIT_BYTES:
            raise _NoProbe(f"a call of {estimate:,} bytes is over the probe limit")
        return Scratch(_probe(program, kernel.nodes[0]), MEASURED)
    except _NoProbe as reason:
        return Scratch(estimate, ESTIMATE.format(why=reason))


def node_scratch(node: fx.Node) -> int | None:
    """The measured scratch of an fx node that takes workspace (``SCRATCH_OPS``:
    a convolution), probed on its operands' recorded metadata, for the
    checkpoint pass's predicted peak (``planning/ledger.py``); None where no
    probe is made (another op, or a reason of the module docstring)."""
    if node.op != "call_function" or not any(op in str(node.target) for op in SCRATCH_OPS):
        return None
    tensors = [n.meta.get("val") for n in node.all_input_nodes] + [node.meta.get("val")]
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    if not all(isinstance(d, int) for t in tensors for d in (*t.shape, *t.stride())):
        return None   # symbolic sizes: no tensor of that shape to call the op on
    size = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    if size > PROBE_LIMIT_BYTES:
        return None
    try:
        return _probe(None, node)
    except _NoProbe:
        return None


def _operand(program: Program | None, node: fx.Node) -> tuple:
    """(shape, strides, dtype, device) of an operand: the plan's layout where
    the program has a buffer of that name, else the recorded value's."""
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        raise _NoProbe(f"operand {node.name} has no recorded tensor")
    if value.device.type != "cpu":
        raise _NoProbe(f"operand {node.name} is on {value.device.type}, not the CPU")
    buffer = program.buffers.get(node.name) if program is not None else None
    if buffer is not None and tuple(buffer.shape) == tuple(value.shape):
        return tuple(buffer.shape), tuple(buffer.strides), value.dtype, "cpu"
    return tuple(value.shape), tuple(value.stride()), value.dtype, "cpu"


def _probe(program: Program | None, head: fx.Node) -> int:
    target = head.target
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        raise _NoProbe(f"{target} is not an aten op")
    layouts: dict[str, tuple] = {}

    def layout(node: fx.Node) -> _Slot:
        layouts[node.name] = _operand(program, node)
        return _Slot(node.name)
    args = fx.node.map_arg(head.args, layout)
    kwargs = fx.node.map_arg(head.kwargs, layout)
    key = (str(target), repr(args), repr(kwargs), tuple(sorted(layouts.items())),
           torch.get_num_threads())
    if key not in _PROBED:
        _PROBED[key] = _call_once(target, args, kwargs, layouts)
    return _PROBED[key]


def _call_once(target, args, kwargs, layouts: dict[str, tuple]) -> int:
    """Call ``target`` on zero-filled tensors of ``layouts`` under the legacy
    profiler: the peak of its allocations minus what it leaves allocated."""
    if torch._C._autograd._profiler_enabled():
        raise _NoProbe("a torch profiler was already running")
    if _python_dispatch._get_current_dispatch_mode() is not None:
        raise _NoProbe("a torch dispatch mode (fake tensors?) was active")
    tensors = {name: torch.empty_strided(shape, strides, dtype=dtype, device=device).zero_()
               for name, (shape, strides, dtype, device) in layouts.items()}

    def real(value):
        return tensors[value.name] if isinstance(value, _Slot) else value
    call_args = fx.node.map_aggregate(args, real)
    call_kwargs = dict(fx.node.map_aggregate(kwargs, real))
    config = profiler_legacy.profile(profile_memory=True).config()
    with torch.no_grad():
        torch.autograd._enable_profiler_legacy(config)
        try:
            results = target(*call_args, **call_kwargs)
        finally:
            records = torch.autograd._disable_profiler_legacy()
    del results   # kept alive until the records were taken: they are not scratch
    return _peak_over_final(records)


def _peak_over_final(records) -> int:
    events = sorted(((event.start_us(), event.cpu_memory_usage()) for thread in records
                     for event in thread if event.kind() == "memory_alloc"),
                    key=lambda pair: pair[0])
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak - live
