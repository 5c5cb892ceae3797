"""Offload on a GPU: step time and device memory with and without ``offload=``.

A stack of wide Linear + GELU layers, forward and backward through
``retrograd.compile``: the default options (on CUDA the planner's automatic
choice, what the bandwidth model picks), ``offload=["addmm", "mm"]`` (every
saved matrix product to host memory) and ``disable=["offload"]``. For each, the
median time of forward + backward, the device bytes held between forward and
backward (``torch.cuda.memory_allocated`` after the forward, less before it)
and the peak (``max_memory_allocated``), plus the offload pass's choice.
Measured independently of the report (which gives the model's figures).

Needs CUDA: on a CPU-only machine it says so and exits with status 0 (the
CPU path is checked by tests/test_offload.py; ``--smoke`` runs a tiny case
on the CPU to check the script itself, where nothing is measured).

    python benchmarks/offload.py --out results-offload.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch import nn


def _model(width: int, layers: int, device: str) -> nn.Module:
    torch.manual_seed(0)
    blocks = [module for _ in range(layers) for module in (nn.Linear(width, width), nn.GELU())]
    return nn.Sequential(*blocks).to(device)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _memory(device: str) -> int:
    return torch.cuda.memory_allocated() if device == "cuda" else 0


def measure(name: str, options: dict, args, device: str) -> dict:
    import retrograd
    net = _model(args.width, args.layers, device)
    compiled = retrograd.compile(net, **options)
    x = torch.randn(args.rows, args.width, device=device)
    times, held = [], 0
    for repeat in range(args.repeat + 1):   # the first call compiles
        _sync(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        before, start = _memory(device), time.perf_counter()
        out = compiled(x)
        _sync(device)
        held = _memory(device) - before
        out.sum().backward()
        _sync(device)
        if repeat:
            times.append(time.perf_counter() - start)
        net.zero_grad(set_to_none=True)
        del out
    report = compiled.reports["forward"]
    stats = next((p["stats"] for p in report["passes"] if p["name"] == "offload"),
                 {"offloaded": [], "offloaded_bytes": 0})   # the pass disabled
    return {"plan": name, "median_seconds": statistics.median(times),
            "held_between_bytes": held,
            "peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
            "offloaded": stats["offloaded"], "offloaded_bytes": stats["offloaded_bytes"],
            "saved_activation_bytes": report["memory"]["saved_activation_bytes"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny, on any device")
    parser.add_argument("--out", help="write the results as JSON there")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        args.width, args.layers, args.rows, args.repeat = 16, 2, 8, 1
    elif device != "cuda":
        print("benchmarks/offload.py: needs CUDA (nothing to measure on a CPU; --smoke "
              "checks the script)")
        return 0
    plans = {"default plan": {}, "offload all products": {"offload": ["addmm", "mm"]},
             "without offload": {"disable": ["offload"]}}
    results = [measure(name, options, args, device) for name, options in plans.items()]
    for row in results:
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                       "torch": torch.__version__, "args": vars(args), "results": results},
                      handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
