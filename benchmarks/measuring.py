"""Memory measured the same way by every benchmark: what autograd saves for
the backward, and the peak of live CPU memory from the profiler.

``saved_storage_bytes(run, excluded)`` runs ``run()`` (which returns a loss)
under ``torch.autograd.graph.saved_tensors_hooks``, sums the bytes of the
unique storages saved, leaving out the tensors in ``excluded`` (parameters,
buffers, inputs: the caller keeps them alive anyway), then runs the backward.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch


def saved_storage_bytes(run: Callable[[], torch.Tensor], excluded: Iterable[torch.Tensor]) -> int:
    skip = {t.untyped_storage().data_ptr() for t in excluded}
    storages: dict[int, int] = {}

    def pack(tensor):
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in skip:
            storages[pointer] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run()
    loss.backward()
    return sum(storages.values())


def profiled_peak(run) -> int:
    """Peak of live torch CPU memory while ``run()`` runs, from the profiler's
    allocation events (running sum of allocations minus frees)."""
    return profiled_allocations(run)[0]


def profiled_allocations(run) -> tuple[int, int]:
    """(peak, final) of live torch CPU memory counted from ``run()``'s start:
    the profiler's allocation events summed in time order; ``final`` is what
    the call left allocated (its results, for one)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as profiler:
        run()
    live = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes())
                            for e in profiler.profiler.kineto_results.events()
                            if e.name() == "[memory]"):
        live += nbytes
        peak = max(peak, live)
    return peak, live
