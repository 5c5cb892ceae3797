"""The CPU default's step with fused ATen ops kept whole (decompositions.TORCH_WHOLE:
"fused") and with the full decomposition table ("decomposed"), against eager:
the three steps timed in turn in one process on the same inputs, so a shared
machine's load falls on all alike. Per zoo model, the median of the fastest
fifth of ``--rounds`` steps of each, and the ratios to eager.

    python benchmarks/fused_ab.py [--models mlp lora] [--rounds 300] [--out results.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RETROGRAD_CACHE_DIR", tempfile.mkdtemp(prefix="retrograd-fused-ab-"))

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import retrograd
from interpreter_cost import _environment, _finish
from retrograd import capture, decompositions
from zoo import ZOO, clone_inputs

MODELS = ["mlp", "cnn", "attention_block", "gpt2_tiny", "lora", "mlp_frozen"]


def _build(name: str, variant: str, inputs):
    """A fresh model of ``name`` as ``variant`` runs it, its first step taken."""
    entry = ZOO[name]
    torch.manual_seed(0)
    model = entry.model()
    if variant == "eager":
        return model
    keep = capture.decompositions_for
    if variant == "decomposed":
        capture.decompositions_for = lambda executor, tensors: (
            decompositions.decomposition_table())
    try:
        compiled = retrograd.compile(model, executor="torch")
        entry.run(compiled, clone_inputs(inputs)).backward()   # forward + backward compiled
    finally:
        capture.decompositions_for = keep
    return compiled


def measure(name: str, rounds: int) -> dict:
    entry = ZOO[name]
    torch.manual_seed(1)
    inputs = entry.inputs()
    built = {v: _build(name, v, inputs) for v in ("eager", "decomposed", "fused")}
    times: dict[str, list[float]] = {v: [] for v in built}
    for _ in range(rounds):
        for variant, model in built.items():
            copies = clone_inputs(inputs)
            start = time.perf_counter()
            entry.run(model, copies).backward()
            times[variant].append(time.perf_counter() - start)
    fastest = {v: statistics.median(sorted(t)[:max(1, rounds // 5)]) for v, t in times.items()}
    return {"model": name, "fastest_fifth_median_s": fastest,
            "decomposed_over_eager": fastest["decomposed"] / fastest["eager"],
            "fused_over_eager": fastest["fused"] / fastest["eager"],
            "fused_over_decomposed": fastest["fused"] / fastest["decomposed"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=sorted(ZOO))
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    before = _environment()
    rows = [measure(name, args.rounds) for name in args.models]
    print("| model | eager | decomposed | fused | decomposed / eager | fused / eager "
          "| fused / decomposed |")
    print("| --- |" + " ---: |" * 6)
    for row in rows:
        t = row["fastest_fifth_median_s"]
        print(f"| {row['model']} | {t['eager'] * 1e3:.3f} ms | {t['decomposed'] * 1e3:.3f} ms "
              f"| {t['fused'] * 1e3:.3f} ms | {row['decomposed_over_eager']:.2f}x "
              f"| {row['fused_over_eager']:.2f}x | {row['fused_over_decomposed']:.3f} |")
    _finish(before, rows, args.out)


if __name__ == "__main__":
    main()
