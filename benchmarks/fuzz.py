"""Long-mode differential fuzzing: many random programs through retrograd and
eager PyTorch (tests/fuzz_*.py), every failure shrunk by hypothesis and
written to a file as Python source a developer can paste.

    python benchmarks/fuzz.py --examples 2000 --seed 0 --out fuzz-failures.txt
    python benchmarks/fuzz.py --face torch.compile --examples 200

The examples run in batches of ``--batch``, each batch a hypothesis run with
its own seed (``--seed`` + batch number), so a failure stops only its batch:
hypothesis shrinks it to a minimal program and the next batch goes on. A
failure whose first line of differences was already reported is counted but
not written again. Exits 1 if anything failed.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

import fuzz_check
import fuzz_programs
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed


def run_batch(seed: int, examples: int, face: str, max_ops: int) -> str | None:
    """One hypothesis run; the shrunk failure's message, or None."""
    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, print_blob=False,
              report_multiple_bugs=False, suppress_health_check=list(HealthCheck))
    @given(fuzz_programs.programs(max_ops=max_ops))
    def fuzz(program):
        fuzz_check.check(program, face)

    try:
        fuzz()
    except Exception as error:   # noqa: BLE001 - the fuzzer's own bugs are reported too
        return _describe(error)
    return None


def _describe(error: BaseException) -> str:
    if isinstance(getattr(error, "exceptions", None), (list, tuple)):   # an ExceptionGroup
        return "\n\n".join(_describe(e) for e in error.exceptions)
    if not isinstance(error, fuzz_check.FuzzFailure):
        return f"the fuzzer raised {type(error).__name__}: {error}"
    cause = error.__cause__
    return str(error) + (f"\n{type(cause).__name__}: {cause}" if cause else "")


def _signature(message: str) -> str:
    """The line that says what differs (or what raised), for de-duplication."""
    lines = message.splitlines()
    differences = [line for line in lines if line.startswith(("output", "grad of", "an output"))]
    return (differences or lines[:1] or [""])[0].split(":")[0] + " | " + lines[-1][:120]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--max-ops", type=int, default=6)
    parser.add_argument("--face", choices=["compile", "torch.compile"], default="compile")
    parser.add_argument("--out", default="fuzz-failures.txt")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    seen: set[str] = set()
    failures, done, batch = 0, 0, 0
    start = time.time()
    while done < args.examples:
        size = min(args.batch, args.examples - done)
        message = run_batch(args.seed + batch, size, args.face, args.max_ops)
        done, batch = done + size, batch + 1
        if message is not None:
            failures += 1
            signature = _signature(message)
            if signature not in seen:
                seen.add(signature)
                with out.open("a") as file:
                    file.write(f"# ---- seed {args.seed + batch - 1}, face {args.face}\n"
                               f"{message}\n\n")
        print(f"{done}/{args.examples} examples, {failures} failing batches "
              f"({len(seen)} distinct), {time.time() - start:.0f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
