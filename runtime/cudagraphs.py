"""CUDA graphs over the arena: capture a program once, replay it.

A program's launches are fixed once it is compiled (one program per input
signature, grids precomputed); what a graph needs besides is fixed
addresses. The arena gives them to planned temporaries: captured in the
graph's private memory pool, each call's arena lands at the same bytes, and
so do the unplanned buffers (extern results, escaping outputs). The rest is
this module:

- Decision (``capture_blockers``, at compile time, from the program): only
  CUDA programs of the ``triton`` or ``torch`` executors, with static sizes,
  no op that reads tensor values on the host (``.item()``, ``equal``: a sync
  that capture forbids, tagged ``data_dependent_output``), no output whose
  size depends on values, nothing tagged ``cudagraph_unsafe``, no tensor made
  on another device (a host copy would be frozen at capture), no host
  offload (its host buffers are made per call), no collective (DDP's
  all-reduce in a step), no RNG with a generator of the caller's. Each
  reason names the op and node; the report carries them.
- Warm-up: the first call runs the program as it is, on the capture stream
  (Triton compiles its kernels, cuBLAS makes its workspace) and notes each
  input's address.
- Capture, at the second call: an input at the same address in both calls
  (a parameter, optimizer state, a program output fed back) is its own
  static slot: the graph reads and writes it where it is. Any other input
  gets a private slot, and later calls copy into it only when the input
  is not already there. Then the graph is replayed for this call's values.
- Replay: a static input that moved is demoted to a private slot and the
  graph captured again (at most once per input); an input of another
  layout than its slot, or another non-tensor value, runs that call
  without the graph.
- Outputs are fresh tensors, never the graph's static ones: each output in
  the graph's pool is copied out (outputs sharing a storage keep sharing
  one copy, so views stay views); an output written in place over an input
  is that input (a private slot's new value is copied back first). This is
  what Inductor's cudagraph trees avoid by handing back static outputs
  and checking their liveness; here a caller may keep outputs across calls
  (gradient accumulation runs two forwards before their backwards) at the
  price of one copy per pool output. ``compile_step`` pays almost nothing:
  its outputs are the loss and the parameters and state it writes in place.
- RNG: torch's CUDA generator reads its seed and offset from device
  tensors while capturing and each replay advances them, so the seeds that
  ``aten.randint`` draws for ``retrograd::uniform`` (compiler/rng.py, which
  reads its seed as a tensor) differ per replay, as eager's draws do.

A capture that fails at run time (an op the decision did not foresee)
warns with the error and the program runs without a graph from then on
(``status`` says why). One call at a time uses the graph (its slots are
shared); a second thread's concurrent call runs the program as it is.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch
from retrograd.runtime.device import device_of

__all__ = ["CapturedExecutable", "CudaGraphs", "capture_blockers", "with_cudagraphs"]

#: Executors whose programs may be captured: fx walks nodes (a debugging aid)
#: and interpret runs on the CPU.
CAPTURED_EXECUTORS = ("triton", "torch")

#: Custom ops that move values through host memory, allocated per call.
HOST_OPS = ("retrograd.offload", "retrograd.prefetch", "retrograd.reload")

#: Namespaces of collectives: capturing them needs NCCL's graph support and
#: every rank capturing alike, untested here; their programs run without.
COLLECTIVES = ("_c10d_functional", "c10d", "c10d_functional")

#: Ops that read a value on the host without saying so in a tag.
HOST_READS = ("aten.is_nonzero", "aten.item", "aten._local_scalar_dense", "aten.allclose")


def _op(node) -> str:
    target = node.target
    name = getattr(target, "_opname", None)
    if name is not None and hasattr(target, "namespace"):
        return f"{target.namespace}.{name}"
    return str(getattr(target, "__name__", target))


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def _node_blocker(node, device: torch.device) -> str | None:
    """Why ``node`` cannot be captured on ``device``, or None."""
    op, tags = _op(node), getattr(node.target, "tags", ())
    where = f"{op} (node {node.name})"
    if torch.Tag.data_dependent_output in tags or op in HOST_READS:
        return f"{where} reads a tensor value on the host (a sync)"
    if torch.Tag.cudagraph_unsafe in tags:
        return f"{where} is tagged cudagraph_unsafe"
    if op in HOST_OPS:
        return f"{where} offloads to host memory allocated per call"
    if op.split(".")[0] in COLLECTIVES:
        return f"{where} is a collective (not captured: untested with NCCL)"
    if node.kwargs.get("generator") is not None:
        return f"{where} draws from a generator of the caller's (not the graph's)"
    for value in _tensors(node.meta.get("val")):
        if any(not isinstance(size, int) for size in value.shape):
            return f"{where} has a dynamic size {tuple(value.shape)}"
        # a 0-dim CPU tensor is a scalar a kernel takes by value: made from
        # constants (CPU inputs run without the graph), the same every call
        if value.device != device and not (value.device.type == "cpu" and value.dim() == 0):
            return f"{where} makes a tensor on {value.device} in a program on {device}"
    return None


def capture_blockers(program, device: torch.device, executor: str,
                     inputs=()) -> list[str]:
    """Every reason ``program`` (called with ``inputs``, real or fake) cannot
    be captured as a CUDA graph; empty: it can."""
    if device.type != "cuda":
        return [f"tensors on {device}: CUDA graphs need CUDA tensors"]
    if executor not in CAPTURED_EXECUTORS:
        return [f"executor={executor!r}: only {CAPTURED_EXECUTORS} programs are captured"]
    # a CPU input, even 0-dim, changes per call: a replay would reuse its captured value
    reasons = [f"input {i} ({name}) is on {value.device}"
               for i, (name, value) in enumerate(zip(program.inputs, inputs))
               if isinstance(value, torch.Tensor) and value.device != device]
    for name, buffer in program.buffers.items():
        if any(not isinstance(size, int) for size in buffer.shape):
            reasons.append(f"buffer {name} has a dynamic size {tuple(buffer.shape)}")
            break
    for kernel in program.kernels:
        for node in kernel.nodes:
            reason = _node_blocker(node, device)
            if reason is not None and reason not in reasons:
                reasons.append(reason)
    return reasons


def decide(requested: bool | None, program, device: torch.device, executor: str,
           inputs=()) -> dict[str, Any]:
    """The report's record: ``{"enabled": bool, "reasons": [...]}``."""
    if requested is False:
        return {"enabled": False, "reasons": ["option cudagraphs=False"]}
    reasons = capture_blockers(program, device, executor, inputs)
    return {"enabled": not reasons, "reasons": reasons}


def with_cudagraphs(executable, program, requested: bool | None, inputs, executor: str,
                    graphs: Callable[[torch.device], Any] | None = None):
    """(``executable`` wrapped to replay CUDA graphs where ``decide`` allows,
    the decision for the report). ``graphs`` makes the capture backend (tests
    hand in a CPU stand-in); ``CudaGraphs`` by default. Explicitly asked for
    and refused: one warning with the reasons."""
    device = device_of(inputs)
    decision = decide(requested, program, device, executor, inputs)
    if not decision["enabled"]:
        if requested is True:
            warnings.warn(f"retrograd: cudagraphs=True, but program {program.name} runs without "
                          f"a CUDA graph: {'; '.join(decision['reasons'])}", stacklevel=2)
        return executable, decision
    backend = (graphs or CudaGraphs)(device)
    return CapturedExecutable(executable, program, backend), decision


class CudaGraphs:
    """The capture backend on CUDA: one private memory pool and side stream
    per program, warm-up and capture on that stream (torch.cuda.graph's
    recipe), replay on the caller's stream."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()

    def warm_up(self, function: Callable[[], list]) -> list:
        """``function``'s outputs, computed on the capture stream; they are used
        on the caller's, so their memory is not reused before that work ends."""
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            outputs = function()
        current.wait_stream(self.stream)
        for output in outputs:
            if isinstance(output, torch.Tensor) and output.is_cuda:
                output.record_stream(current)
        return outputs

    def capture(self, function: Callable[[], list], slots: list) -> tuple[Any, list]:
        """The graph of ``function`` (which reads ``slots``) and its static outputs."""
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            outputs = function()
        return graph, outputs

    @staticmethod
    def replay(graph) -> None:
        graph.replay()


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
            and a.device == b.device)


def _written_inputs(program) -> set[int]:
    """Positions of the inputs the program writes in place (buffer donation)."""
    roots = set()
    for buffer in program.buffers.values():
        name, seen = buffer.reuses, set()
        while name is not None and name not in seen:
            seen.add(name)
            roots.add(name)
            donor = program.buffers.get(name)
            name = donor.reuses if donor is not None else None
    return {position for position, name in enumerate(program.inputs) if name in roots}


class CapturedExecutable:
    """An executable whose calls after the first replay one captured graph."""

    def __init__(self, executable, program, backend):
        self.executable, self.program, self.backend = executable, program, backend
        self.unread = set(program.frees.get(-1, []))
        self.unread = {i for i, name in enumerate(program.inputs) if name in self.unread}
        self.written = _written_inputs(program)
        self.lock = threading.Lock()
        self.addresses: list[int | None] | None = None   # the warm-up call's
        self.private: set[int] = set()    # positions demoted to a private slot
        self.slots: list = []
        self.graph = None
        self.outputs: list = []
        self.status: dict[str, Any] = {"state": "warm-up", "reason": None, "captures": 0,
                                       "replays": 0, "copied_inputs": 0, "plain_calls": 0}

    def __getattr__(self, name):   # paths, program, modules: the executable's
        wrapped = self.__dict__.get("executable")
        if wrapped is None or name.startswith("__"):   # copy's half-built object
            raise AttributeError(name)
        return getattr(wrapped, name)

    def __call__(self, args: list) -> list:
        if self.status["state"] == "off" or not self.lock.acquire(blocking=False):
            return self._plain(args)
        try:
            if self.addresses is None:
                self.addresses = [_address(a) for a in args]
                values = list(args)
                args.clear()
                return self.backend.warm_up(lambda: self.executable(values))
            return self._graph_call(args)
        finally:
            self.lock.release()

    def _plain(self, args: list) -> list:
        self.status["plain_calls"] += 1
        return self.executable(args)

    def _graph_call(self, args: list) -> list:
        if self.graph is None or self._moved(args):
            if not self._capture(args):
                return self._plain(args)
        elif not self._fits(args):
            self.status["reason"] = "a call's inputs differ in layout, device or value " \
                                    "from the captured ones"
            return self._plain(args)
        else:
            self._fill(args)
        self.backend.replay(self.graph)
        self.status["replays"] += 1
        outputs = self._hand_back(args)
        args.clear()
        return outputs

    # -- capture ------------------------------------------------------------------
    def _moved(self, args: list) -> bool:
        """Demote every static input that is no longer where the graph reads it;
        whether any was (the graph must then be captured again)."""
        moved = [i for i, slot in enumerate(self.slots)
                 if i not in self.private and i not in self.unread
                 and isinstance(slot, torch.Tensor) and isinstance(args[i], torch.Tensor)
                 and (_address(args[i]) != _address(slot) or not _same_layout(args[i], slot))]
        self.private.update(moved)
        return bool(moved)

    def _capture(self, args: list) -> bool:
        """Slots for ``args`` and the graph over them; False (run without) when an
        input is not on the program's device or capture fails."""
        device = self.backend.device
        strays = [i for i, a in enumerate(args)
                  if isinstance(a, torch.Tensor) and a.device != device and i not in self.unread]
        if strays:
            self.status["reason"] = f"input {strays[0]} on {args[strays[0]].device}"
            return False
        self.graph, self.outputs = None, []   # the old graph's pool memory can be reused
        slots = []
        for i, value in enumerate(args):
            static = _address(value) == self.addresses[i] if i < len(self.addresses) else False
            if not isinstance(value, torch.Tensor) or i in self.unread or (
                    static and i not in self.private):
                slots.append(value)
                continue
            self.private.add(i)
            slot = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype,
                                       device=value.device)
            slots.append(slot.copy_(value))
        try:
            graph, outputs = self.backend.capture(lambda: self.executable(list(slots)), slots)
        except Exception as error:  # noqa: BLE001 -- any capture error: run without
            self.status.update(state="off", reason=f"capture failed: {type(error).__name__}: "
                                                   f"{error}")
            warnings.warn(f"retrograd: program {self.program.name} runs without a CUDA graph: "
                          f"{self.status['reason']}", stacklevel=4)
            return False
        self.graph, self.outputs, self.slots = graph, list(outputs), slots
        self.status["captures"] += 1
        self.status["state"] = "captured"
        return True

    # -- replay -------------------------------------------------------------------
    def _fits(self, args: list) -> bool:
        """Whether ``args`` can be fed to the captured slots (same layouts, same
        non-tensor values, every tensor on the graph's device)."""
        if len(args) != len(self.slots):
            return False
        for i, (value, slot) in enumerate(zip(args, self.slots)):
            if isinstance(slot, torch.Tensor):
                if not isinstance(value, torch.Tensor) or (
                        i not in self.unread and not _same_layout(value, slot)):
                    return False
            elif isinstance(value, torch.Tensor) or value != slot:
                return False
        return True

    def _fill(self, args: list) -> None:
        """Copy each input into its private slot, unless it is there already."""
        for i in self.private:
            if i not in self.unread and _address(args[i]) != _address(self.slots[i]):
                self.slots[i].copy_(args[i])
                self.status["copied_inputs"] += 1

    def _hand_back(self, args: list) -> list:
        """This call's outputs as fresh tensors (see the module docstring)."""
        for i in self.written & self.private:   # in place, as without the graph
            if _address(args[i]) != _address(self.slots[i]):
                args[i].copy_(self.slots[i])
        slot_of = {slot.untyped_storage().data_ptr(): i for i, slot in enumerate(self.slots)
                   if isinstance(slot, torch.Tensor)}
        copies: dict[int, torch.UntypedStorage] = {}
        results = []
        for output in self.outputs:
            if not isinstance(output, torch.Tensor):
                results.append(output)
                continue
            where = output.untyped_storage().data_ptr()
            position = slot_of.get(where)
            if position is not None and position in self.private:
                value, slot = args[position], self.slots[position]
                offset = value.storage_offset() + output.storage_offset() - slot.storage_offset()
                results.append(value.as_strided(output.shape, output.stride(), offset))
            elif position is not None:
                results.append(output)   # the caller's own tensor, written in place
            else:
                if where not in copies:
                    copies[where] = _bytes(output).clone().untyped_storage()
                results.append(torch.empty(0, dtype=output.dtype, device=output.device).set_(
                    copies[where], output.storage_offset(), output.shape, output.stride()))
        return results


def _address(value) -> int | None:
    return value.data_ptr() if isinstance(value, torch.Tensor) else None


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The whole storage under ``tensor`` as a uint8 tensor."""
    return torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(tensor.untyped_storage())
