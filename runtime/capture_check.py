"""What a program does on the host while it runs: a capture-safety checker.

A CUDA graph replays the device work of one run; host work is frozen at
capture. A run is safe to capture when it (1) never reads a tensor value on
the host (``.item()``, ``bool(t)``, a copy to the CPU: a sync that capture
forbids and that a replay would not redo), (2) makes every tensor on the
program's device (a CPU tensor computed per call would be stale on replay),
and (3) allocates the same storages in the same order every call (capture
pins each allocation at an address in the graph's pool). ``CaptureChecker``
records all three through a ``TorchDispatchMode``, so it runs on the CPU
too, where no graph exists: tests run a program under it and check the
record against the plan (``expected_allocations``).

It sees dispatched torch ops only (and the Python bodies of retrograd's
own custom ops): a Triton launch is not one (tests stub the launches,
which are device work with fixed pointers once compiled).
"""

from __future__ import annotations

import torch
from torch._library import custom_ops
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["CaptureChecker", "expected_allocations"]

#: Ops that hand a tensor value to the host without a tag that says so.
_HOST_READS = {"aten::is_nonzero", "aten::item", "aten::_local_scalar_dense",
               "aten::allclose", "aten::equal"}


class CaptureChecker(TorchDispatchMode):
    """Records host syncs, tensors off ``device`` and new storages of one run.

    Args:
        device: the program's device.
        known: tensors that exist before the run (its inputs): their
            storages are not counted as allocations.
    """

    def __init__(self, device: torch.device, known=()):
        super().__init__()
        self.device, self.known = torch.device(device), list(known)
        self.syncs: list[str] = []           # ops that read a value on the host
        self.strays: list[str] = []          # tensors made off the program's device
        self.allocations: list[tuple[str, int]] = []   # (op, bytes) of each new storage
        self.seen = {t.untyped_storage().data_ptr() for t in _tensor_list(self.known)}
        self.kept = list(_tensor_list(self.known))   # storages stay alive: addresses unique

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        if torch.Tag.data_dependent_output in func.tags or name in _HOST_READS:
            self.syncs.append(name)
        inputs = _tensor_list((args, kwargs))
        result = self._run(func, args, kwargs)
        for tensor in _tensor_list(result):
            if tensor.device != self.device:
                self.strays.append(f"{name} -> {tensor.device}")
                if any(t.device != tensor.device for t in inputs):
                    self.syncs.append(f"{name} (a copy between devices)")
            address = tensor.untyped_storage().data_ptr()
            if address not in self.seen and tensor.untyped_storage().nbytes() > 0:
                self.seen.add(address)
                self.kept.append(tensor)
                self.allocations.append((name, tensor.untyped_storage().nbytes()))
        return result

    def _run(self, func, args, kwargs):
        """``func``; a custom op of ours runs its Python body under this mode,
        so its own ops are checked too (``retrograd::uniform``'s Philox)."""
        definition = custom_ops.OPDEFS.get(func.name()) if func.namespace == "retrograd" \
            else None
        if definition is None:
            return func(*args, **kwargs)
        with self:
            return definition._init_fn(*args, **kwargs)

    @property
    def safe(self) -> bool:
        return not self.syncs and not self.strays


def _tensor_list(value) -> list[torch.Tensor]:
    return [v for v in tree_flatten(value)[0] if isinstance(v, torch.Tensor)]


def expected_allocations(program) -> int:
    """How many storages a run of ``program``'s generated wrapper makes, by its
    plan: one per arena, and one per buffer a kernel writes outside the arenas
    and not in place over another (an extern call's result, an escaping
    value); views and ``out=`` calls into the arena make none."""
    count = len(program.arenas)
    for kernel in program.kernels:
        if kernel.kind == "view":
            continue
        for name in kernel.outputs:
            buffer = program.buffers[name]
            if buffer.offset is None and buffer.reuses is None:
                count += 1
    return count
