"""A CPU training step in parts: forward, loss and backward, eager against retrograd.

Per zoo model (tests/zoo.py), eager and ``retrograd.compile`` (the CPU
default, ``executor="auto"``: the torch program) run one step each in turn,
``--steps`` times after 10 warm-ups, and each part of each step is timed in
this thread's CPU time (``time.thread_time``: on a shared machine it leaves
out the time other jobs held the core). Medians are printed and written
with ``--out``; the step ratio is retrograd's median step over eager's.
Gradients accumulate in ``.grad`` across steps in both, as in
``cpu_step.py``. Measuring two trees (before/after a change): run this
script with each tree's retrograd importable and ``ROOT`` the tree whose
``tests/zoo.py`` to use (``--root``).

    python benchmarks/cpu_step_parts.py [--steps 400] [--models mlp lora] [--out parts.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RETROGRAD_CACHE_DIR", tempfile.mkdtemp(prefix="retrograd-parts-"))

import torch

MODELS = ["mlp", "cnn", "attention_block", "gpt2_tiny", "lora", "mlp_frozen"]
PARTS = ["forward_s", "loss_s", "backward_s"]


def _parts(entry, model, inputs, clone_inputs) -> tuple[float, float, float]:
    copies = clone_inputs(inputs)
    start = time.thread_time()
    output = entry.call(model, *copies)
    forward = time.thread_time()
    loss = entry.loss(output)
    lossed = time.thread_time()
    loss.backward()
    return forward - start, lossed - forward, time.thread_time() - lossed


def measure(name: str, steps: int) -> dict:
    """Median seconds of each part, eager and retrograd, on zoo model ``name``."""
    import retrograd
    from zoo import ZOO, clone_inputs
    entry = ZOO[name]
    torch.manual_seed(0)
    eager = entry.model()
    torch.manual_seed(0)
    compiled = retrograd.compile(entry.model())
    inputs = entry.inputs()
    times: dict[str, list] = {"eager": [], "retrograd": []}
    for step in range(10 + steps):
        for variant, model in (("eager", eager), ("retrograd", compiled)):
            parts = _parts(entry, model, inputs, clone_inputs)
            if step >= 10:
                times[variant].append(parts)
    row: dict = {"model": name}
    for variant, measured in times.items():
        row[variant] = {part: statistics.median(p[i] for p in measured)
                        for i, part in enumerate(PARTS)}
        row[variant]["step_s"] = statistics.median(sum(p) for p in measured)
    row["ratio"] = row["retrograd"]["step_s"] / row["eager"]["step_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the tree whose tests/zoo.py defines the models")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(args.root / "tests"))
    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        row = measure(name, args.steps)
        rows.append(row)
        mine = row["retrograd"]
        print(f"{name}: eager {row['eager']['step_s'] * 1e6:.0f} us, retrograd "
              f"{mine['step_s'] * 1e6:.0f} us (forward {mine['forward_s'] * 1e6:.0f}, "
              f"backward {mine['backward_s'] * 1e6:.0f}), {row['ratio']:.2f}x", flush=True)
    if args.out is not None:
        import retrograd
        args.out.write_text(json.dumps({"retrograd": retrograd.__file__, "steps": args.steps,
                                        "torch": torch.__version__, "rows": rows,
                                        "load_average": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()
