"""Every OpInfo of PyTorch's database that has a float32 backward, through
both faces (``retrograd.compile`` and ``torch.compile(backend="retrograd")``),
against eager: values and gradients. Writes docs/opinfo.md.

Each OpInfo gets a verdict (tests/opinfo_harness.py): pass, extern-only,
xfail (retrograd's own UnsupportedError), wrong, crash, skip (no usable
sample), or timeout (``--timeout`` seconds per OpInfo). Verdicts are appended
to a JSON-lines file as they come, so a long run can be sharded, stopped and
summed up later:

    python benchmarks/opinfo_sweep.py --shard 0/4 --jsonl /tmp/sweep-0.jsonl
    python benchmarks/opinfo_sweep.py --from /tmp/sweep-*.jsonl --write docs/opinfo.md
    python benchmarks/opinfo_sweep.py --ops linalg.tensorsolve,tensor_split --samples 2

``--limit N`` runs the first N selected OpInfos, ``--seed`` seeds the sample
values (and, with ``--limit``, picks a random subset instead of the first N).
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import opinfo_harness as harness

STATUSES = ("pass", "extern-only", "xfail", "wrong", "crash", "timeout", "skip")


def select(args) -> list:
    """The OpInfos this run covers: ``--ops``, then ``--shard``, then ``--limit``."""
    ops = harness.autograd_opinfos()
    if args.ops:
        wanted = set(args.ops.split(","))
        ops = [op for op in ops if harness.op_id(op) in wanted or op.name in wanted]
    if args.shard:
        index, count = (int(part) for part in args.shard.split("/"))
        ops = ops[index::count]
    if args.limit is not None and args.limit < len(ops):
        ops = sorted(random.Random(args.seed).sample(ops, args.limit), key=harness.op_id) \
            if args.seed else ops[:args.limit]
    return ops


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


def run_one(op, args) -> dict:
    """One OpInfo's verdict as a JSON-ready dict."""
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(args.timeout)
    try:
        verdict = harness.classify(op, count=args.samples, seed=args.seed)
        row = {"op": verdict.op, "status": verdict.status, "detail": verdict.detail,
               "faces": verdict.faces, "samples": verdict.samples,
               "triton": verdict.triton, "extern_ops": sorted(verdict.extern_ops)}
    except _Timeout:
        row = {"op": harness.op_id(op), "status": "timeout",
               "detail": f"over {args.timeout} s", "faces": {}}
    finally:
        signal.alarm(0)
        torch._dynamo.reset()
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def sweep(args) -> list[dict]:
    rows = []
    ops = select(args)
    for number, op in enumerate(ops):
        row = run_one(op, args)
        rows.append(row)
        print(f"[{number + 1}/{len(ops)}] {row['op']}: {row['status']} ({row['seconds']} s) "
              f"{row.get('detail', '')[:160]}", flush=True)
        if args.jsonl:   # one line per OpInfo, as it comes: a stopped run keeps what it did
            with open(args.jsonl, "a") as out:
                out.write(json.dumps(row) + "\n")
    return rows


def load(paths) -> list[dict]:
    """Rows from JSON-lines files; a later row for the same OpInfo wins."""
    rows: dict[str, dict] = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["op"]] = row
    return sorted(rows.values(), key=lambda row: row["op"])


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:200]


def _share(count: int, total: int) -> str:
    return f"{100 * count / total:.1f}%" if total else "n/a"


def markdown(rows: list[dict], total: int, note: str) -> str:
    """docs/opinfo.md: how much ran, the totals, then one row per OpInfo."""
    counts = Counter(row["status"] for row in rows)
    judged = len(rows) - counts["skip"]
    right = counts["pass"] + counts["extern-only"]
    lines = [
        "# The OpInfo database through retrograd",
        "",
        "Written by `benchmarks/opinfo_sweep.py` (see its docstring for the options); do not",
        "edit by hand. Each OpInfo of PyTorch's database with a float32 CPU backward",
        "(`supports_autograd`) runs its first usable samples through `retrograd.compile` and",
        "`torch.compile(backend=\"retrograd\")` (Triton interpreter) and is compared with eager:",
        "every output and the gradient of every input that requires grad, for one random",
        "upstream gradient (tests/opinfo_harness.py says how). Verdicts: **pass** (right, and a",
        "generated Triton kernel ran), **extern-only** (right, every node ran as an extern aten",
        "call), **xfail** (retrograd refused with its own `UnsupportedError`), **wrong**,",
        "**crash** (any other exception: an internal error), **timeout**, **skip** (no usable",
        "sample: eager refuses it, or every sample is complex, empty or too large).",
        "",
        (f"**Coverage of this run:** {len(rows)} of the {total} OpInfos with a float32 "
         f"backward. {note}"),
        "",
        "The verdict is the worst over both faces; the face columns give each face's own",
        "(there, pass means right values and gradients; whether Triton ran is counted over",
        "both faces).",
        "",
        "| verdict | OpInfos | retrograd.compile | torch.compile |",
        "| --- | ---: | ---: | ---: |",
    ]
    per_face = {face: Counter(row.get("faces", {}).get(face) for row in rows)
                for face in harness.FACES}
    lines += [f"| {status} | {counts[status]} | {per_face['compile'][status]} | "
              f"{per_face['torch.compile'][status]} |" for status in STATUSES]
    never_wrong = judged - counts["wrong"] - counts["crash"] - counts["timeout"]
    lines += ["", f"Of the {judged} OpInfos with a usable sample: gradient-right on both faces "
              f"(pass + extern-only) **{right} = {_share(right, judged)}**; never a wrong "
              f"number nor a crash (retrograd's own UnsupportedError allowed) **{never_wrong} = "
              f"{_share(never_wrong, judged)}**; internal crashes **{counts['crash']}**. "
              "Gradient-right per face: " + ", ".join(
                  f"{face} {_share(per_face[face]['pass'] + per_face[face]['extern-only'], judged)}"
                  for face in harness.FACES) + ".", ""]
    for status in ("crash", "wrong", "timeout", "xfail"):
        bad = [row for row in rows if row["status"] == status]
        if bad:
            lines += [f"## {status}", ""]
            lines += [f"- `{row['op']}`: {_cell(row.get('detail', ''))}" for row in bad]
            lines.append("")
    lines += ["## Every OpInfo run", "",
              "| OpInfo | verdict | compile | torch.compile | Triton kernels | extern ops | s |",
              "| --- | --- | --- | --- | ---: | --- | ---: |"]
    for row in rows:
        faces = row.get("faces", {})
        lines.append(f"| `{row['op']}` | {row['status']} | {faces.get('compile', '')} | "
                     f"{faces.get('torch.compile', '')} | {row.get('triton', '')} | "
                     f"{_cell(', '.join(row.get('extern_ops', [])))} | {row['seconds']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", help="comma-separated OpInfo names or ids (name.variant)")
    parser.add_argument("--limit", type=int, help="at most this many OpInfos")
    parser.add_argument("--shard", help="i/n: every n-th OpInfo from the i-th")
    parser.add_argument("--seed", type=int, default=0, help="sample values; subset with --limit")
    parser.add_argument("--samples", type=int, default=1, help="usable samples per OpInfo")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per OpInfo")
    parser.add_argument("--jsonl", help="append each verdict to this file")
    parser.add_argument("--from", dest="sources", nargs="*", help="sum up these JSON-lines files")
    parser.add_argument("--write", help="write the markdown report here (docs/opinfo.md)")
    parser.add_argument("--note", default="", help="a sentence for the report's coverage line")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    rows = load(args.sources) if args.sources else sweep(args)
    if args.write:
        total = len(harness.autograd_opinfos())
        Path(args.write).write_text(markdown(rows, total, args.note))
    counts = Counter(row["status"] for row in rows)
    print(", ".join(f"{status} {counts[status]}" for status in STATUSES))
    return 1 if counts["crash"] or counts["wrong"] else 0


if __name__ == "__main__":
    sys.exit(main())
