"""A long training run, watching memory and caches over time (issue 11).

A small model trains with ``compile_step`` for ``--minutes``, its batch size
cycling through ``--shapes`` values (``--steps-per-shape`` steps each), so
several programs live side by side; with ``--max-programs`` below
``--shapes`` programs are also released and compiled again. Every
``--every`` seconds it prints (and with ``--out`` writes as JSON lines):
elapsed seconds, steps, resident memory, the programs the step keeps,
generated modules loaded, and the kernel cache folder's files and bytes.

At the end it fits a least-squares line to resident memory against steps,
leaving out the first cycle through the shapes (first compiles) and the
first ``--warm`` fraction of the samples (allocator warm-up), and exits 1
if memory grows faster than ``--max-slope`` bytes a step, or if more
programs are kept than the bound. Each release and recompile grows torch's
own caches (see docs/design.md, "Bounded growth"; measured here about
0.6 MiB a recompile), so runs that recompile need a looser slope or a
longer ``--steps-per-shape``.

    python benchmarks/soak.py --minutes 10 --out soak.jsonl
    python benchmarks/soak.py --minutes 2 --shapes 3 --max-programs 2 --max-slope 1024
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import retrograd
import torch
from retrograd.runtime import disk_cache, loader


def resident_bytes() -> int:
    """Resident memory of this process (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def slope(samples: list[dict], warm: float, first_cycle: int) -> float:
    """Bytes of resident memory per step, least squares, after the warm share
    of the samples and after every shape has been compiled once."""
    kept = [s for s in samples[int(len(samples) * warm):] if s["steps"] > first_cycle]
    if len(kept) < 2 or kept[0]["steps"] == kept[-1]["steps"]:
        return 0.0
    mean_step = sum(s["steps"] for s in kept) / len(kept)
    mean_rss = sum(s["rss"] for s in kept) / len(kept)
    covariance = sum((s["steps"] - mean_step) * (s["rss"] - mean_rss) for s in kept)
    return covariance / sum((s["steps"] - mean_step) ** 2 for s in kept)


def sample(start: float, steps: int, step: retrograd.step.Step) -> dict:
    files = disk_cache.cache_files(loader.cache_dir())
    return {"seconds": round(time.monotonic() - start, 1), "steps": steps,
            "rss": resident_bytes(), "programs": len(step.entries),
            "loaded": len(loader._LOADED), "cache_files": len(files),
            "cache_bytes": sum(file.size for file in files)}


def show(row: dict) -> str:
    return (f"{row['seconds']:8.1f} {row['steps']:8d} {row['rss'] / 2**20:8.1f} "
            f"{row['programs']:8d} {row['loaded']:7d} {row['cache_files']:11d} "
            f"{row['cache_bytes']:11d}")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--shapes", type=int, default=3, help="batch sizes cycled through")
    parser.add_argument("--steps-per-shape", type=int, default=100)
    parser.add_argument("--max-programs", type=int, default=None,
                        help="the step's bound (default: --shapes, so nothing is released)")
    parser.add_argument("--max-slope", type=float, default=256.0,
                        help="most resident bytes a step may add after warm-up")
    parser.add_argument("--warm", type=float, default=0.2,
                        help="share of the samples left out of the fit")
    parser.add_argument("--out", help="write the samples here as JSON lines")
    return parser.parse_args()


def main() -> int:
    args = arguments()
    limit = args.max_programs or args.shapes
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = retrograd.compile_step(model, lambda m, x, y: (m(x) - y).pow(2).mean(), optimizer,
                                  max_programs=limit)
    warnings.simplefilter("ignore")   # the bound's warning, once, when programs are released
    out = open(args.out, "w") if args.out else None   # noqa: SIM115 -- closed below
    print(f"{'seconds':>8s} {'steps':>8s} {'RSS MiB':>8s} {'programs':>8s} {'loaded':>7s} "
          f"{'cache files':>11s} {'cache bytes':>11s}", flush=True)
    start = time.monotonic()
    samples, steps, next_sample, most_programs = [], 0, 0.0, 0
    while time.monotonic() - start < args.minutes * 60:
        rows = 2 + (steps // args.steps_per_shape) % args.shapes
        x, y = torch.randn(rows, 8), torch.randn(rows, 1)
        step(x, y)
        steps += 1
        most_programs = max(most_programs, len(step.entries))
        if time.monotonic() - start >= next_sample:
            samples.append(sample(start, steps, step))
            print(show(samples[-1]), flush=True)
            if out:
                out.write(json.dumps(samples[-1]) + "\n")
            next_sample += args.every
    if out:
        out.close()
    growth = slope(samples, args.warm, args.shapes * args.steps_per_shape)
    print(f"{steps} steps; resident memory grows {growth:.0f} bytes a step after warm-up "
          f"(allowed {args.max_slope:.0f}); at most {most_programs} programs kept "
          f"(bound {limit})")
    return 1 if growth > args.max_slope or most_programs > limit else 0


if __name__ == "__main__":
    sys.exit(main())
