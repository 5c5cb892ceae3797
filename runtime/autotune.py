"""A bounded autotune with its results on disk: which launch configuration of
a kernel is fastest, among candidates that compute what the default does.

``tune`` is generic: it knows configurations only as dicts, and runs each
through the caller's ``measure(config) -> (milliseconds, outputs)``. The
default configuration (the one codegen would have chosen) runs first: its
outputs are the reference every other candidate must match (``same``:
bitwise for elementwise kernels, within the dtype's tolerance where a
reduction's block changes the order of its sums); a candidate that does
not, or that fails (out of resources, say), is rejected and never wins.
Candidates are tried in order until the
time budget is spent (the rest are recorded as not tried). The fastest
exact one wins; ties keep the earlier (the default first).

Results live in the kernel cache folder (``runtime/tuning_cache.py``: one
record per key, a Python literal read with ``ast.literal_eval``, evicted
and cleared with the kernels), keyed by what the caller says identifies the
kernel (its default source, which names shape, strides, dtype and fused
ops) and the device; a later compile of the same kernel on the same device
reads the winner without timing anything. The record (what was tried, in
milliseconds; what was rejected and why; what won; cache hit or miss) is
what the report shows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from retrograd.runtime import tuning_cache

__all__ = ["BUDGET_SECONDS", "tune"]

#: Wall time one kernel's autotune may take (candidates past it are not tried).
BUDGET_SECONDS = 2.0

Measure = Callable[[dict], tuple[float, Any]]
Same = Callable[[Any, Any], bool]


def tune(kind: str, key: dict[str, Any], candidates: Sequence[dict], measure: Measure,
         same: Same, budget: float = BUDGET_SECONDS) -> dict[str, Any]:
    """The record for ``key``: from the cache, else by measuring ``candidates``
    (the first is the default and the reference) within ``budget`` seconds.
    ``record["config"]`` is the winner."""
    cached = tuning_cache.lookup(kind, key)
    if cached is not None:
        return {**{k: v for k, v in cached.items() if k != "key"}, "cache": "hit"}
    started = time.perf_counter()
    default, *others = candidates
    milliseconds, reference = measure(default)
    tried = [{"config": default, "ms": _ms(milliseconds)}]
    rejected, stopped = [], None
    for config in others:
        if time.perf_counter() - started > budget:
            stopped = f"time cap {budget}s reached after {len(tried) + len(rejected)} configs"
            break
        try:
            milliseconds, outputs = measure(config)
        except Exception as error:  # noqa: BLE001 -- a candidate that fails is not chosen
            rejected.append({"config": config, "why": f"failed: {type(error).__name__}: "
                                                      f"{str(error)[:200]}"})
            continue
        if not same(outputs, reference):
            rejected.append({"config": config, "why": "outputs differ from the default's"})
            continue
        tried.append({"config": config, "ms": _ms(milliseconds)})
    best = min(tried, key=lambda entry: entry["ms"])   # min keeps the first of equals
    record = {"config": best["config"], "default": default, "tried": tried,
              "rejected": rejected, "stopped": stopped}
    tuning_cache.store(kind, key, record)
    return {**record, "cache": "miss"}


def _ms(value: float) -> float:
    return round(float(value), 6)
