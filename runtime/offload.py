"""Offloaded activations: the copies out to host memory and back, as three ops.

A saved activation the planner offloads (``passes/offload.py``) crosses from
forward to backward as a host tensor instead of a device one. The graph
holds three custom ops, extern calls like any aten op:

- ``retrograd::offload(x, asynchronous) -> host`` in the forward, after
  ``x``'s last forward reader: a copy of ``x`` in host memory (contiguous).
  The device copy then dies with ``x``, where the memory plan frees it.
- ``retrograd::prefetch(host, shape, stride, device, after, asynchronous) ->
  token`` in the backward, some kernels before the first reader (``after``
  only orders it: a value of the backward it must not run before): starts
  the copy back into a fresh device tensor of ``x``'s strides and returns a
  0-dim token naming it.
- ``retrograd::reload(host, token) -> x`` at the first backward reader:
  the prefetched device tensor, once its copy is complete (or a copy made
  now when no prefetch ran, as under verify's graph runs).

On CUDA the host tensor is pinned and both copies run on one side stream
per device, overlapped with the kernels of the main stream (Megatron's and
DeepSpeed's activation offloading work the same way): ``offload`` makes the
side stream wait for the main stream's work so far (``x`` is written), and
copies from ``x`` itself when ``x`` owns its storage (``record_stream``
then keeps the caching allocator from handing the block out before the copy
ends) or from a device clone when ``x`` is a view into a larger storage (an
arena slot, which the memory plan gives to the next value right after ``x``
dies: a device-to-device copy is ~100x faster than PCIe, and the clone alone
waits for the side stream). ``prefetch`` allocates on the side stream, so the
copy waits for nothing the main stream does, and ``reload`` makes the main
stream wait for that copy's event. With ``asynchronous=False`` (verify, which
reads the host tensors on the CPU) each copy completes before the op returns.

On the CPU the "device" is the CPU: ``offload`` returns a separate CPU copy
(the device copy is freed as on CUDA), ``prefetch`` copies it back into a new
tensor, so tests check the same graph, plan and numbers without a GPU.
"""

from __future__ import annotations

import threading

import torch
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ["offload", "pending", "prefetch", "reload"]

_lock = threading.Lock()
#: token -> (device tensor being filled, event on the side stream or None)
_prefetched = WeakTensorKeyDictionary()
_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device):
    """One copy stream per CUDA device, made on first use."""
    with _lock:
        stream = _side_streams.get(device)
        if stream is None:
            stream = _side_streams[device] = torch.cuda.Stream(device=device)
        return stream


def _owns_storage(x: torch.Tensor) -> bool:
    """``x`` spans its whole storage: no other value of the program lives there."""
    return x.storage_offset() == 0 and x.untyped_storage().nbytes() == x.nbytes \
        and x.is_contiguous()


def _offload_cuda(x: torch.Tensor, asynchronous: bool) -> torch.Tensor:
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    main, side = torch.cuda.current_stream(x.device), _side_stream(x.device)
    # an arena slot is reused right after: copy from a clone of its own
    source = x if _owns_storage(x) else x.clone(memory_format=torch.contiguous_format)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        host.copy_(source, non_blocking=True)
    source.record_stream(side)
    if not asynchronous:
        side.synchronize()
    return host


@torch.library.custom_op("retrograd::offload", mutates_args=())
def offload(x: torch.Tensor, asynchronous: bool) -> torch.Tensor:
    """A contiguous copy of ``x`` in host memory (pinned on CUDA)."""
    if x.device.type == "cuda":
        return _offload_cuda(x, asynchronous)
    return x.to("cpu", memory_format=torch.contiguous_format, copy=True)


@offload.register_fake
def _(x, asynchronous):
    return torch.empty(x.shape, dtype=x.dtype, device="cpu")


def _prefetch_cuda(host: torch.Tensor, shape, stride, device: torch.device,
                   asynchronous: bool):
    side = _side_stream(device)
    with torch.cuda.stream(side):   # allocated in the side stream's pool: waits for nothing
        target = torch.empty_strided(shape, stride, dtype=host.dtype, device=device)
        target.copy_(host, non_blocking=True)
        event = torch.cuda.Event()
        event.record(side)
    if not asynchronous:
        event.synchronize()
    return target, event


@torch.library.custom_op("retrograd::prefetch", mutates_args=())
def prefetch(host: torch.Tensor, shape: list[int], stride: list[int], device: torch.device,
             after: torch.Tensor | None, asynchronous: bool) -> torch.Tensor:
    """Start copying ``host`` back to ``device`` with ``stride``; the token
    returned names the copy for ``reload``. ``after`` only orders the op."""
    device = torch.device(device)
    if device.type == "cuda":
        entry = _prefetch_cuda(host, shape, stride, device, asynchronous)
    else:
        target = torch.empty_strided(shape, stride, dtype=host.dtype, device=device)
        entry = (target.copy_(host), None)
    token = torch.zeros((), dtype=torch.int64)
    with _lock:
        _prefetched[token] = entry
    return token


@prefetch.register_fake
def _(host, shape, stride, device, after, asynchronous):
    return torch.empty((), dtype=torch.int64, device="cpu")


@torch.library.custom_op("retrograd::reload", mutates_args=())
def reload(host: torch.Tensor, token: torch.Tensor, shape: list[int], stride: list[int],
           device: torch.device) -> torch.Tensor:
    """The device copy ``prefetch`` started under ``token``, complete; a copy
    made here if there is none (the op run without its prefetch)."""
    with _lock:
        entry = _prefetched.pop(token, None)
    if entry is None:
        target = torch.empty_strided(shape, stride, dtype=host.dtype, device=device)
        return target.copy_(host)
    target, event = entry
    if event is not None:
        main = torch.cuda.current_stream(target.device)
        main.wait_event(event)
        target.record_stream(main)
    return target


@reload.register_fake
def _(host, token, shape, stride, device):
    return torch.empty_strided(shape, stride, dtype=host.dtype, device=device)


def pending() -> int:
    """Prefetched copies not reloaded yet (tests: none may be left behind)."""
    with _lock:
        return len(_prefetched)
