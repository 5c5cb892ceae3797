"""Block sizes of pointwise and reduction kernels, autotuned (option ``autotune``).

codegen picks a block by rule (``choose_block``, ``choose_reduction_blocks``);
``Tuner.configure`` is the hook ``generate_sources`` asks instead when the
option is on. For each kernel it writes the candidates' sources (pointwise:
BLOCK from a quarter to four times the rule's, within the kernel's size;
reduction: ROWS and RBLOCK halved and doubled around the rule's, never a
split reduction), runs each on random inputs shaped as the plan says
(inputs are never written: outputs are separate tensors even where the
program writes one over an input) and times it, through
``runtime/autotune.py``: bounded in time, the default first as the
reference every candidate must match (bitwise for pointwise kernels,
within the dtype's tolerance for reductions, whose sums change order),
results cached on disk per kernel (its source less the names: one
repeated block of a model is tuned once) and device; a program's tuning
stops after ``PROGRAM_BUDGET_SECONDS``.

``num_warps`` is the second dimension (``with_warps``): 1, 2, 4 or 8, at
most one thread per element of the tile (BLOCK, or ROWS x RBLOCK), Triton's
default 4 always. The candidates are at most 5 blocks x 4 warps = 20
(``MAX_CANDIDATES``), ordered so that a budget cut keeps the neighbours of
the rule's: the default, the other warps at the rule's block, the other
blocks at 4 warps, then the rest. The winner's ``num_warps`` is written
into the kernel's ``launch`` (``kernel[grid](..., num_warps=W)``), stored in
the cache record and shown in the report's record; Triton's interpreter
ignores it (one program instance at a time), so there it changes nothing.

Only on CUDA by default (``autotune=None``): under Triton's interpreter a
time says nothing about a GPU. ``autotune=True`` forces it there too (tests:
every candidate runs and must be exact, a second compile hits the cache),
timed by the wall clock; ``False`` never tunes. The records go to the codegen
pass's stats (``report.json``): what was tried (ms), rejected, what won.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from time import perf_counter
from typing import Any

import numpy
import torch
from retrograd.codegen.pointwise import generate_pointwise
from retrograd.codegen.reduction import generate_reduction
from retrograd.ir import Kernel, Program
from retrograd.numerics import tolerance
from retrograd.runtime.autotune import tune
from retrograd.runtime.device import interpreter_mode
from retrograd.runtime.executor import without_cycles
from retrograd.runtime.loader import load_module, source_key, write_source

__all__ = ["KIND", "Tuner", "pointwise_candidates", "reduction_candidates", "with_warps"]

#: File stem of the records in the kernel cache.
KIND = "block_tuning"
#: Wall time all of one program's tuning may take; later kernels keep the rule's block.
PROGRAM_BUDGET_SECONDS = 15.0
#: Largest ROWS x RBLOCK tile a candidate may have beyond the rule's (twice its 4096).
TILE_LIMIT = 8192
#: ``num_warps`` tried; Triton's default (what an untuned launch gets) first.
WARPS = (4, 1, 2, 8)
#: Threads per warp: a candidate's warps never have more threads than its tile has elements.
WARP_THREADS = 32
#: Blocks (at most 5) times warps (at most 4): the most candidates one kernel has.
MAX_CANDIDATES = 5 * len(WARPS)
#: What the cache key says was searched (records of the block-only search are misses).
SPACE = "block x num_warps"

Timer = Callable[[Callable[[], Any]], float]


def _power(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def pointwise_candidates(block: int, numel: int) -> list[dict]:
    """The rule's BLOCK first, then a quarter to four times it (16 to the kernel's size)."""
    limit = max(16, _power(numel))
    sizes = [block] + [block * f // 4 for f in (1, 2, 8, 16)]
    return [{"block": size} for size in dict.fromkeys(s for s in sizes if 16 <= s <= limit)]


def reduction_candidates(rows: int, r_block: int, numel: int, extent: int) -> list[dict]:
    """The rule's (ROWS, RBLOCK) first, then each halved and doubled, within the
    sizes and a tile of ``TILE_LIMIT`` elements (or the rule's, if larger)."""
    rows_limit, r_limit = _power(numel), _power(extent)
    tile = max(rows * r_block, TILE_LIMIT)   # elements per program: registers
    pairs = [(rows, r_block), (rows * 2, r_block), (max(1, rows // 2), r_block),
             (rows, r_block * 2), (rows, max(1, r_block // 2))]
    return [{"rows": a, "r_block": b} for a, b in dict.fromkeys(pairs)
            if a <= max(rows, rows_limit) and b <= max(r_block, r_limit) and a * b <= tile]


def with_warps(blocks: list[dict], tile: Callable[[dict], int]) -> list[dict]:
    """``blocks`` (the rule's first) crossed with the ``WARPS`` a tile of
    ``tile(config)`` elements can use (Triton's default 4 always, 1 always,
    others while ``warps * 32 <= tile``): the default first, then the other
    warps at the rule's block, the other blocks at 4 warps, then the rest."""
    def allowed(config):
        return [w for w in WARPS if w in (WARPS[0], 1) or w * WARP_THREADS <= tile(config)]
    first, *others = blocks
    ordered = [{**first, "num_warps": w} for w in allowed(first)]
    ordered += [{**config, "num_warps": WARPS[0]} for config in others]
    ordered += [{**config, "num_warps": w} for config in others for w in allowed(config)[1:]]
    return ordered[:MAX_CANDIDATES]


def identity(source: str, kernel: Kernel) -> str:
    """``source`` without what names this kernel rather than says what it
    computes: the header docstring (graph and node names), and the kernel's
    and its values' names, renamed in order of appearance. Two kernels that
    differ only there (one block of a model repeated) share a tuning record."""
    body = source.split('"""', 2)[2] if source.startswith('"""') else source
    names = {kernel.name, *kernel.inputs, *kernel.outputs, *kernel.node_names}
    found: dict[str, str] = {}

    def rename(match: re.Match) -> str:
        return found.setdefault(match.group(0), f"v{len(found)}")
    pattern = "|".join(sorted(map(re.escape, names), key=len, reverse=True))
    # not after a dot (a node named erf is not tl.math.erf); with the writers'
    # suffixes (x_ptr, x_in0, x_acc) renamed alike
    return re.sub(rf"(?<!\.)\b(?:{pattern})(?=(?:_[A-Za-z]+\d*)?\b)", rename, body) \
        if names else body


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _do_bench(function: Callable[[], Any]) -> float:
    import triton.testing  # local: only on CUDA
    return float(triton.testing.do_bench(function, warmup=5, rep=20))


def _wall(function: Callable[[], Any]) -> float:
    """One run's wall time in ms (forced tuning off a GPU: a mechanism test, no measure)."""
    started = perf_counter()
    function()
    return 1e3 * (perf_counter() - started)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as integers (NaN-safe bitwise comparison)."""
    if not tensor.is_floating_point():
        return tensor
    kinds = {8: torch.int64, 4: torch.int32, 2: torch.int16}
    return tensor.contiguous().view(kinds[tensor.element_size()])


def _same_bits(got: list, want: list) -> bool:
    return all(torch.equal(_bits(a), _bits(b)) for a, b in zip(got, want))


def _close(got: list, want: list) -> bool:
    for a, b in zip(got, want):
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return False
            continue
        limit = tolerance(a.dtype)
        scale = float(b.double().abs().nan_to_num(0, 0, 0).max()) if b.numel() else 0.0
        if not torch.allclose(a.double(), b.double(), rtol=limit, atol=limit * scale,
                              equal_nan=True):
            return False
    return True


class Tuner:
    """``generate_sources``' ``configure`` hook for one program, and its records."""

    def __init__(self, requested: bool | None, device: torch.device, interpreted: bool,
                 timer: Timer | None = None):
        self.device, self.interpreted = device, interpreted
        self.reason = None
        if requested is False:
            self.reason = "option autotune=False"
        elif requested is None and device.type != "cuda":
            self.reason = (f"{device.type}: tuned only on CUDA by default (a time under "
                           f"the interpreter says nothing of a GPU); autotune=True forces it")
        self.enabled = self.reason is None
        self.timer = timer or (_do_bench if device.type == "cuda" else _wall)
        self.records: dict[str, dict] = {}
        self.started, self.program_budget = perf_counter(), PROGRAM_BUDGET_SECONDS

    def summary(self) -> dict[str, Any]:
        """The report's record: enabled, why not, and per kernel what was tried and won."""
        return {"enabled": self.enabled, "reason": self.reason, "kernels": self.records}

    def configure(self, kernel: Kernel, program: Program, family: str, default):
        """(block, num_warps) of ``kernel``, tuned; ``default`` is the rule's
        block (an int BLOCK for "pointwise", (ROWS, RBLOCK) for "reduction")
        and comes back with None (Triton's default warps) when not tuned."""
        buffers, graph = program.buffers, program.name
        if family == "pointwise":
            candidates = with_warps(pointwise_candidates(default, kernel.numel),
                                    lambda c: c["block"])
            def generate(c): return generate_pointwise(kernel, buffers, c["block"], graph,
                                                       num_warps=c["num_warps"])
            def chosen(c): return c["block"]
            same = _same_bits
        else:
            candidates = with_warps(
                reduction_candidates(*default, kernel.numel, kernel.extent),
                lambda c: c["rows"] * c["r_block"])
            def generate(c): return generate_reduction(kernel, buffers, c["rows"], c["r_block"],
                                                       graph, num_warps=c["num_warps"])
            def chosen(c): return (c["rows"], c["r_block"])
            same = _close
        if len(candidates) < 2:
            return default, None
        if perf_counter() - self.started > self.program_budget:
            self.records[kernel.name] = {"config": candidates[0], "skipped": (
                f"the program's tuning budget ({self.program_budget}s) is spent")}
            return default, None
        key = {"kernel": source_key(identity(generate(candidates[0]), kernel)),
               "family": family, "device": _device_name(self.device), "space": SPACE}
        tensors = self._tensors(kernel, program)
        record = tune(KIND, key, candidates,
                      lambda config: self._measure(kernel, generate(config), tensors), same)
        self.records[kernel.name] = record
        return chosen(record["config"]), record["config"].get("num_warps")

    def _tensors(self, kernel: Kernel, program: Program) -> dict[str, torch.Tensor]:
        """Random inputs and zeroed outputs, shaped as the plan says (seeded)."""
        generator = torch.Generator(self.device).manual_seed(0)
        tensors = {}
        for name in kernel.inputs + kernel.outputs:
            buffer = program.buffers.get(name)
            if buffer is None:
                tensors[name] = program.constants[name]
                continue
            value = torch.empty_strided(buffer.shape, buffer.strides, device=self.device,
                                        dtype=getattr(torch, buffer.dtype)).zero_()
            if name in kernel.inputs and value.is_floating_point():
                value.normal_(generator=generator)
            tensors[name] = value
        return tensors

    def _measure(self, kernel: Kernel, source: str, tensors: dict) -> tuple[float, list]:
        """(ms, outputs) of one candidate's source."""
        launch = load_module(write_source(kernel.name, source), self.interpreted).launch
        if self.interpreted:
            launch = without_cycles(launch)
        outputs = [tensors[name] for name in kernel.outputs]
        for output in outputs:
            output.zero_()
        arguments = [tensors[name] for name in kernel.inputs] + outputs
        with interpreter_mode(self.interpreted), numpy.errstate(all="ignore"):
            milliseconds = self.timer(lambda: launch(*arguments))
        return milliseconds, [output.clone() for output in outputs]
