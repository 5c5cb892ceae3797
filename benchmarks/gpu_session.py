"""The one command of a GPU session: every training-step configuration of
issue 15 ("Measure") once, compile included, under a time budget.

    python benchmarks/gpu_session.py                 # on a CUDA machine, ~8 minutes at most
    python benchmarks/gpu_session.py --smoke         # tiny configurations, any device

GPT-2 small (12 layers, 768 wide, seq 1024, batch 8) and a LLaMA-shaped model
(GQA, RMSNorm, SwiGLU, 8 layers, 1024 wide), bf16 autocast, AdamW (fused
outside compile_step), under eager, torch.compile default, retrograd (torch.compile
backend), ``retrograd.compile_step`` (CUDA graphs on, the default, and off:
``compile_step-nographs``; each compile_step record says whether the step
was captured and replayed, ``cudagraphs``) and, last, torch.compile max-autotune;
before them a float32 gradient check of retrograd against eager on tiny
models. ``benchmarks/step.py`` measures each (median step time, peak of
``torch.cuda.max_memory_allocated``).

Budgets: the whole session has ``--budget`` seconds; each job its own limit
(``--job-budget``). The jobs run in a worker process; one that runs past its
limit, or past the session's end, is killed with its process group and
recorded as ``"skipped": "budget (...)"`` (a job that could not start in time
likewise), and a fresh worker goes on with the rest. A job that fails is
recorded with its traceback; on CUDA the worker then restarts, so a broken
context cannot spoil the next job.

Writes ``<out-dir>/results-step-<card>-<date>.json`` (card from
``torch.cuda.get_device_name``; torch, triton, transformers and retrograd
versions; the commit), the same name ``.md`` (a table for BENCHMARKS.md, also
printed) and ``.log`` (the worker's output). Without CUDA and without
``--smoke`` it says that it needs CUDA and exits with status 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import step  # benchmarks/step.py: the models, variants, measurement, table)

# seconds per job kind on a GPU (compile included); --job-budget KEY=SECONDS overrides
JOB_BUDGET = {"gradient-check": 90, "eager": 60, "inductor": 150, "retrograd": 180,
              "compile_step": 180, "compile_step-nographs": 150, "max-autotune": 240}
SMOKE_JOB_BUDGET = 240          # each job of --smoke, on a slow shared CPU
MIN_START = 20                  # seconds left in the session below which a job is not started
# compile_step-nographs: the same step with cudagraphs=False, what CUDA graphs gain
ORDER = ("eager", "inductor", "compile_step", "compile_step-nographs", "retrograd")
# max-autotune runs after all


def plan(models: list[str], variants: list[str], max_autotune: bool,
         gradient_check: bool = True) -> list[tuple]:
    """(model, kind) in run order: gradient checks, each model's variants, then max-autotune."""
    jobs = [(model, "gradient-check") for model in models if gradient_check]
    jobs += [(model, v) for model in models for v in ORDER if v in variants]
    if max_autotune:
        jobs += [(model, "max-autotune") for model in models]
    return jobs


def job_budget(job: tuple, args) -> float:
    model, kind = job
    budget = SMOKE_JOB_BUDGET if args.smoke else JOB_BUDGET[kind]
    overrides = dict(item.split("=", 1) for item in args.job_budget)
    for key in (kind, f"{model}/{kind}"):           # the more specific one wins
        if key in overrides:
            budget = float(overrides[key])
    return budget


# ---------------------------------------------------------------- the worker process

def worker(spec_path: str) -> int:
    """Run the jobs in ``spec_path`` in order, one JSON line per event to its progress file."""
    spec = json.loads(Path(spec_path).read_text())
    import torch
    from retrograd.backend import register
    register()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with open(spec["progress"], "a", buffering=1) as progress:
        for model, kind in spec["jobs"]:
            job = named((model, kind))
            left = spec["deadline"] - time.time()
            if left < spec["min_start"]:
                record = {**job, "skipped": too_late(left, spec["min_start"])}
                progress.write(json.dumps({"event": "done", "record": record}) + "\n")
                continue
            progress.write(json.dumps({"event": "start", "job": [model, kind]}) + "\n")
            record = run_job(device, model, kind, spec)
            progress.write(json.dumps({"event": "done", "record": record}) + "\n")
            if "error" in record and device == "cuda":
                return 3            # a fresh process for the rest: the context may be broken
    return 0


def run_job(device: str, model: str, kind: str, spec: dict) -> dict:
    job = named((model, kind))
    started = time.perf_counter()
    try:
        if kind == "gradient-check":
            result = {**job, **step.gradient_check(device, model)}
        else:
            sizes = (step.SMOKE if spec["smoke"] else step.PRESETS)[model]
            result = {**job, **step.run_variant(model, kind, sizes, spec["steps"],
                                                spec["warmup"])}
    except Exception:  # noqa: BLE001  (recorded with its traceback; the next job runs)
        traceback.print_exc()
        result = {**job, "error": traceback.format_exc()[-3000:]}
    result["job_seconds"] = time.perf_counter() - started
    print(json.dumps(result)[:3000], flush=True)
    return result


# ---------------------------------------------------------------- the session

def run_jobs(jobs: list[tuple], args, deadline: float, log_path: Path) -> list[dict]:
    """Every job once, in workers; a job past its limit is killed and recorded."""
    records: dict[tuple, dict] = {}
    pending = list(jobs)
    with tempfile.TemporaryDirectory(prefix="gpu-session-") as scratch:
        attempt = 0
        while pending:
            left = deadline - time.time()
            if left < args.min_start:                  # no worker started just to skip
                for job in pending:
                    records[tuple(job)] = {**named(job),
                                           "skipped": too_late(left, args.min_start)}
                    report(records[tuple(job)])
                break
            attempt += 1
            progress = Path(scratch, f"progress-{attempt}.jsonl")
            spec = Path(scratch, f"spec-{attempt}.json")
            spec.write_text(json.dumps({
                "jobs": pending, "progress": str(progress), "deadline": deadline,
                "min_start": args.min_start, "smoke": args.smoke, "steps": args.steps,
                "warmup": args.warmup}))
            progress.touch()
            watch(spec, progress, args, deadline, log_path, records)
            left = [job for job in pending if tuple(job) not in records]
            if left and left[0] == pending[0]:       # the worker died before its first job
                records[tuple(left[0])] = failed(tuple(left[0]),
                                                 "worker exited: " + tail(log_path))
                left = left[1:]
            pending = left
    return [records[tuple(job)] for job in jobs]


def watch(spec: Path, progress: Path, args, deadline: float, log_path: Path,
          records: dict) -> None:
    """Start a worker on ``spec`` and follow it until it exits or a job overruns."""
    with open(log_path, "a") as log:
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    current, limit, seen = None, None, 0
    while True:
        exited = process.poll() is not None      # read after: every line is in the file
        lines = progress.read_text().split("\n")[:-1]    # complete lines only
        for line in lines[seen:]:
            event = json.loads(line)
            if event["event"] == "start":
                current = tuple(event["job"])
                budget = job_budget(current, args)
                limit = min(time.time() + budget, deadline), budget
            else:
                record = event["record"]
                records[(record["model"], record["variant"])] = record
                report(record)
                current = None
        seen = len(lines)
        if exited:
            if current is not None:
                records[current] = failed(current, f"worker exited with {process.returncode}: "
                                          + tail(log_path))
                report(records[current])
            return
        if current is not None and time.time() > limit[0]:
            os.killpg(process.pid, signal.SIGKILL)   # the worker and its compile workers
            process.wait()
            why = "its own limit" if limit[0] < deadline else "the session's end"
            records[current] = {**named(current), "skipped": (
                f"budget (killed at {why}: {limit[1]:.0f} s for the job, session budget "
                f"{args.budget:.0f} s)")}
            report(records[current])
            return
        time.sleep(0.2)


def named(job: tuple) -> dict:
    return {"model": job[0], "variant": job[1], "name": step.VARIANTS.get(job[1], job[1])}


def too_late(left: float, needed: float) -> str:
    return f"budget ({left:.0f} s left of the session, {needed:.0f} s needed to start)"


def failed(job: tuple, error: str) -> dict:
    return {**named(job), "error": error}


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def report(record: dict) -> None:
    state = ("skipped: " + record["skipped"] if "skipped" in record else
             "FAILED" if "error" in record else
             f"{record['median_ms']:.2f} ms, peak {record['peak_bytes']}" if "median_ms" in record
             else json.dumps({k: v for k, v in record.items() if k != "name"}))
    print(f"[{time.strftime('%H:%M:%S')}] {record['model']} {record['variant']}: {state}",
          flush=True)


def environment(smoke: bool) -> dict:
    """Card, versions and commit of this run."""
    import retrograd
    import torch
    info = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "retrograd": retrograd.__version__, "python": platform.python_version(),
            "host": platform.node(), "smoke": smoke}
    for name in ("triton", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    info["commit"], info["dirty"] = commit()
    return info


def commit() -> tuple[str, bool | None]:
    """HEAD and whether tracked files differ from it (RETROGRAD_COMMIT where git is absent)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return head, bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("RETROGRAD_COMMIT", "unknown"), None


def card_slug(device: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA H200' -> 'h200', 'cpu' -> 'cpu'."""
    words = [w for w in device.replace("NVIDIA", "").split() if w]
    word = next((w for w in words if any(c.isdigit() for c in w)), words[0] if words else "gpu")
    return "".join(c if c.isalnum() else "-" for c in word.lower()).strip("-") or "gpu"


def write(results: dict, out_dir: Path, stem: str) -> tuple[Path, Path]:
    runs = results["runs"]
    table = step.markdown_table(runs)
    env = results["environment"]
    header = (f"{env['device']}, {results['date']}, torch {env['torch']} (CUDA {env['cuda']}), "
              f"triton {env['triton']}, transformers {env['transformers']}, retrograd "
              f"{env['retrograd']} at {env['commit'][:12]}{' (dirty)' if env['dirty'] else ''}; "
              f"median of {results['steps']} steps after {results['warmup']} warm-up steps "
              f"(compile included there); ratios are run / reference (lower is better).")
    checks = "\n".join(f"- gradient check, {r['model']} (fp32, tiny): " + (
        f"max relative error {r['max_relative_grad_error']:.2e} over {r['parameters']} "
        f"parameters, limit {r['limit']:.0e}: {'passed' if r['passed'] else 'FAILED'}"
        if "max_relative_grad_error" in r else r.get("skipped") or "failed")
        for r in results["gradient_check"])
    markdown = f"{header}\n\n{table}\n" + (f"\n{checks}\n" if checks else "")
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path.write_text(markdown)
    print("\n" + markdown)
    return json_path, md_path


def session(args) -> int:
    import torch
    if not args.smoke and not torch.cuda.is_available():
        print("benchmarks/gpu_session.py needs a CUDA device (torch.cuda.is_available() is "
              "False here); `--smoke` runs tiny configurations on CPU to check the script.",
              file=sys.stderr)
        return 2
    started = time.time()
    deadline = started + args.budget
    env = environment(args.smoke)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    stem = f"results-step-{card_slug(env['device'])}{'-smoke' if args.smoke else ''}-{date}"
    out_dir = Path(args.out_dir or (tempfile.mkdtemp(prefix="gpu-session-smoke-")
                                    if args.smoke else HERE))
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / f"{stem}.log"
    log_path.write_text("")
    max_autotune = args.max_autotune
    if max_autotune is None:                 # on CUDA, or when --variants names it
        max_autotune = not args.smoke or "max-autotune" in args.variants.split(",")
    jobs = plan(args.models.split(","), args.variants.split(","), max_autotune,
                args.gradient_check)
    print(f"{env['device']}: {len(jobs)} jobs, budget {args.budget:.0f} s; log {log_path}\n  "
          + ", ".join(f"{m}/{k} ({job_budget((m, k), args):.0f} s)" for m, k in jobs),
          flush=True)
    records = run_jobs(jobs, args, deadline, log_path)
    sizes = step.SMOKE if args.smoke else step.PRESETS
    results = {"date": date, "environment": env, "budget_seconds": args.budget,
               "job_budgets": {f"{m}/{k}": job_budget((m, k), args) for m, k in jobs},
               "steps": args.steps, "warmup": args.warmup,
               "configs": {m: sizes[m] for m in args.models.split(",")},
               "gradient_check": [r for r in records if r["variant"] == "gradient-check"],
               "runs": step.with_ratios([r for r in records
                                         if r["variant"] != "gradient-check"]),
               "wall_seconds": time.time() - started}
    json_path, md_path = write(results, out_dir, stem)
    print(f"wrote {json_path}, {md_path}, {log_path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny configurations, any device (checks the script)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole session (default 480; --smoke 900)")
    parser.add_argument("--job-budget", action="append", default=[], metavar="KEY=SECONDS",
                        help="a job's limit; KEY is a kind (eager, inductor, retrograd, "
                             "compile_step, max-autotune, gradient-check) or model/kind")
    parser.add_argument("--max-autotune", action=argparse.BooleanOptionalAction, default=None,
                        help="run torch.compile max-autotune last (default: on CUDA, "
                             "not with --smoke)")
    parser.add_argument("--gradient-check", action=argparse.BooleanOptionalAction, default=True,
                        help="check retrograd's gradients against eager first (tiny models)")
    parser.add_argument("--models", default="gpt2,llama")
    parser.add_argument("--variants", default=",".join(ORDER))
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3)")
    parser.add_argument("--min-start", type=float, default=None,
                        help=f"seconds a job needs left to start (default {MIN_START})")
    parser.add_argument("--out-dir", default=None,
                        help="where results go (default benchmarks/; --smoke: a temp dir)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    for name, known in (("models", step.BUILDERS), ("variants", step.VARIANTS)):
        unknown = set(getattr(args, name).split(",")) - set(known)
        if unknown:
            parser.error(f"unknown {name} {sorted(unknown)}; known: {', '.join(known)}")
    smoke = args.smoke
    args.budget = args.budget if args.budget is not None else (900 if smoke else 480)
    args.steps = args.steps if args.steps is not None else (2 if smoke else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 3)
    args.min_start = args.min_start if args.min_start is not None else (1 if smoke else MIN_START)
    return session(args)


if __name__ == "__main__":
    sys.exit(main())
