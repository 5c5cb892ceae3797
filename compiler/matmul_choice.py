"""Template or extern: the bounded autotune behind ``matmul_templates=None``.

passes/matmul_fusion.py proposes a template kernel (an mm with its fused
prologue and epilogue; a bmm's too) and asks ``choose`` through
``OpSupport``. On CUDA it times the extern path -- ``torch.mm`` (``addmm``,
``bmm``, ``baddbmm``) plus the separate pointwise kernels fusion made for
the prologue and epilogue -- against the template
with each of a few block configurations (``matmul_template.candidate_configs``),
within ``BUDGET_SECONDS``; the fastest wins. The result is stored per kernel
source (so per shape, strides, dtype and fused ops), device and versions in
the kernel cache folder (runtime/tuning_cache.py) and reused by later
compiles; the record (what was tried in ms, what won, whether it came from
the cache) goes to the pass's stats, so into ``report.json``.

On any other device the extern call stays (Triton's interpreter is no
measure of speed). ``autotune`` takes the timer as an argument, so its
bookkeeping can be tested without a GPU; ``choose`` gives it Triton's
``do_bench``.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

import torch

from retrograd.codegen.matmul_template import (BATCHED_OPS, candidate_configs, generate_matmul,
                                               operands, split_nodes)
from retrograd.codegen.pointwise import choose_block, generate_pointwise
from retrograd.ir import Buffer, Kernel, Kind
from retrograd.runtime import tuning_cache
from retrograd.runtime.loader import load_module, source_key, write_source

__all__ = ["choose", "autotune", "BUDGET_SECONDS", "KIND"]

#: Wall time one matmul's autotune may take (configs past it are not tried).
BUDGET_SECONDS = 5.0
#: File stem of the records in the kernel cache.
KIND = "matmul_tuning"

Timer = Callable[[Callable[[], Any]], float]


def _tensor(buffer: Buffer, device: torch.device) -> torch.Tensor:
    value = torch.empty_strided(buffer.shape, buffer.strides, dtype=getattr(torch, buffer.dtype),
                                device=device)
    return value.normal_() if value.is_floating_point() else value.zero_()


def _launcher(name: str, source: str, interpreted: bool):
    return load_module(write_source(name, source), interpreted).launch


def _extern_runner(pieces: list[Kernel], buffers: dict[str, Buffer], tensors, interpreted):
    """The extern path as a function: the mm, then the pointwise kernels."""
    steps = []
    for kernel in pieces:
        names = kernel.inputs + kernel.outputs
        if kernel.kind == Kind.EXTERN:
            left, right, bias, alpha, beta = operands(kernel.nodes[0])
            left, right, out = (tensors[n] for n in (left.name, right.name, kernel.outputs[0]))
            batched = kernel.nodes[0].target in BATCHED_OPS
            if bias is None:
                steps.append(functools.partial(torch.bmm if batched else torch.mm, left, right,
                                               out=out))
            else:
                steps.append(functools.partial(torch.baddbmm if batched else torch.addmm,
                                               tensors[bias.name], left, right,
                                               beta=beta, alpha=alpha, out=out))
        else:
            source = generate_pointwise(kernel, buffers, choose_block(kernel.numel, interpreted))
            steps.append(functools.partial(_launcher(kernel.name, source, interpreted),
                                           *(tensors[n] for n in names)))
    return lambda: [step() for step in steps]


def _key(merged: Kernel, buffers: dict[str, Buffer], device: torch.device) -> dict[str, Any]:
    identity = generate_matmul(merged, buffers, interpreted=False, config=candidate_configs(
        merged)[0])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {"kernel": source_key(identity), "device": name}


def autotune(merged: Kernel, pieces: list[Kernel], buffers: dict[str, Buffer], *,
             timer: Timer, interpreted: bool = False,
             budget: float = BUDGET_SECONDS) -> tuple[bool, dict | None, dict]:
    """(template?, its config, the record): from the cache, else by timing the
    extern path and each candidate config with ``timer`` (milliseconds)."""
    device = split_nodes(merged)[2].meta["val"].device
    key = _key(merged, buffers, device)
    cached = tuning_cache.lookup(KIND, key)
    if cached is not None:
        record = {k: v for k, v in cached.items() if k != "key"}
        return record["chosen"] == "template", record.get("config"), {**record, "cache": "hit"}
    names = {n for k in [merged, *pieces] for n in k.inputs + k.outputs}
    tensors = {n: _tensor(buffers[n], device) for n in names}
    started = time.perf_counter()
    extern_ms = timer(_extern_runner(pieces, buffers, tensors, interpreted))
    tried, stopped = [], None
    for config in candidate_configs(merged):
        if time.perf_counter() - started > budget:
            stopped = f"time cap {budget}s reached after {len(tried)} configs"
            break
        source = generate_matmul(merged, buffers, interpreted, config=config)
        launch = _launcher(merged.name, source, interpreted)
        milliseconds = timer(functools.partial(launch, *(tensors[n] for n in
                                                         merged.inputs + merged.outputs)))
        tried.append({"config": config, "ms": round(float(milliseconds), 6)})
    best = min(tried, key=lambda entry: entry["ms"], default=None)
    use = best is not None and best["ms"] < extern_ms
    record = {"chosen": "template" if use else "extern", "extern_ms": round(float(extern_ms), 6),
              "tried": tried, "config": best["config"] if use else None, "stopped": stopped}
    tuning_cache.store(KIND, key, record)
    return use, record["config"], {**record, "cache": "miss"}


def _do_bench(function: Callable[[], Any]) -> float:
    import triton.testing   # local: only on CUDA
    return float(triton.testing.do_bench(function, warmup=5, rep=20))


def choose(merged: Kernel, pieces: list[Kernel],
           buffers: dict[str, Buffer]) -> tuple[bool, dict | None, dict]:
    """The pass's question: on CUDA the autotune with Triton's ``do_bench``;
    elsewhere the extern call."""
    device = split_nodes(merged)[2].meta["val"].device
    if device.type != "cuda":
        return False, None, {"why": f"{device.type}: the extern call is the default there"}
    return autotune(merged, pieces, buffers, timer=_do_bench)
