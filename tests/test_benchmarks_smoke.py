"""The GPU session's one command (benchmarks/gpu_session.py) and benchmarks/step.py,
checked on CPU: their --smoke mode end to end in a worker process, the
budget that kills a job which runs too long, the job that cannot start in
time, the refusal without CUDA, and the table's ratios. No timing is asserted:
only that each job produced a measurement, a skip or an error of the right kind."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_session
import step


def session(tmp_path, *arguments, timeout=600):
    """Run the session script with --smoke into tmp_path; its results JSON."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_session.py"),
                           "--smoke", "--out-dir", str(tmp_path), *arguments],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [path] = tmp_path.glob("results-step-*-smoke-*.json")
    markdown = path.with_suffix(".md").read_text()
    return json.loads(path.read_text()), markdown


def test_smoke_measures_and_kills_a_job_past_its_budget(tmp_path):
    """eager and compile_step of the tiny GPT-2 are measured (with ratios to
    eager); max-autotune, given half a second, is killed and recorded as
    skipped for the budget, and the files name card, versions and commit."""
    results, markdown = session(tmp_path, "--models", "gpt2", "--variants",
                                "eager,compile_step", "--no-gradient-check",
                                "--max-autotune", "--job-budget", "max-autotune=0.5")
    runs = {run["variant"]: run for run in results["runs"]}
    assert list(runs) == ["eager", "compile_step", "max-autotune"]
    for variant in ("eager", "compile_step"):
        assert runs[variant]["median_ms"] > 0 and "error" not in runs[variant]
        assert runs[variant]["loss"] == pytest.approx(runs["eager"]["loss"], rel=1e-3)
    assert runs["eager"]["time_x_eager"] == 1.0
    assert runs["compile_step"]["time_x_inductor"] is None      # Inductor not run
    assert runs["max-autotune"]["skipped"].startswith("budget (killed at its own limit")
    env = results["environment"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__
    assert env["retrograd"] and env["triton"] and env["commit"]
    assert "| gpt2 | retrograd compile_step |" in markdown
    assert "skipped: budget (killed" in markdown


def test_a_job_that_cannot_start_in_time_is_skipped(tmp_path):
    """The worker, in this process: with the session's end already past, each
    job is recorded as skipped for the budget without running."""
    progress = tmp_path / "progress.jsonl"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({
        "jobs": [["gpt2", "eager"], ["llama", "gradient-check"]], "progress": str(progress),
        "deadline": time.time() - 1, "min_start": 20, "smoke": True, "steps": 1,
        "warmup": 1}))
    assert gpu_session.worker(str(spec)) == 0
    records = [json.loads(line)["record"] for line in progress.read_text().splitlines()]
    assert [(r["model"], r["variant"]) for r in records] == [("gpt2", "eager"),
                                                           ("llama", "gradient-check")]
    assert all(r["skipped"].startswith("budget (") and "median_ms" not in r for r in records)


def test_a_session_out_of_time_starts_no_worker(tmp_path, capsys):
    """With no budget left, every job is recorded as skipped and the files are
    still written (in this process: no worker is started)."""
    assert gpu_session.main(["--smoke", "--budget", "0", "--out-dir", str(tmp_path)]) == 0
    [path] = tmp_path.glob("results-step-*-smoke-*.json")
    results = json.loads(path.read_text())
    records = results["runs"] + results["gradient_check"]
    assert len(records) == 2 * len(gpu_session.ORDER) + 2   # and the gradient checks
    assert all(r["skipped"].startswith("budget (") for r in records)
    assert "| llama | retrograd | skipped: budget (" in path.with_suffix(".md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for CPU-only machines")
def test_without_cuda_it_says_so(capsys):
    assert gpu_session.main([]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_plan_runs_max_autotune_last_and_checks_gradients_first():
    jobs = gpu_session.plan(["gpt2", "llama"], ["retrograd", "eager", "inductor"], True)
    assert jobs[:2] == [("gpt2", "gradient-check"), ("llama", "gradient-check")]
    assert jobs[2:5] == [("gpt2", "eager"), ("gpt2", "inductor"), ("gpt2", "retrograd")]
    assert jobs[-2:] == [("gpt2", "max-autotune"), ("llama", "max-autotune")]


def test_card_names():
    assert gpu_session.card_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_session.card_slug("NVIDIA H200") == "h200"
    assert gpu_session.card_slug("NVIDIA A100-SXM4-80GB") == "a100-sxm4-80gb"
    assert gpu_session.card_slug("cpu") == "cpu"


def test_ratios_are_against_the_same_models_eager_and_inductor():
    runs = [{"model": "gpt2", "variant": "eager", "name": "eager", "median_ms": 40.0,
             "peak_bytes": 800, "warmup_seconds": 1.0},
            {"model": "gpt2", "variant": "inductor", "name": "torch.compile default",
             "median_ms": 20.0, "peak_bytes": 400, "warmup_seconds": 9.0},
            {"model": "gpt2", "variant": "retrograd", "name": "retrograd", "median_ms": 18.0,
             "peak_bytes": 300, "warmup_seconds": 9.0},
            {"model": "llama", "variant": "retrograd", "name": "retrograd",
             "skipped": "budget (killed)"}]
    rows = step.with_ratios(runs)
    assert rows[2]["time_x_eager"] == 0.45 and rows[2]["time_x_inductor"] == 0.9
    assert rows[2]["peak_x_eager"] == 0.375 and rows[2]["peak_x_inductor"] == 0.75
    assert rows[3]["time_x_eager"] is None
    table = step.markdown_table(runs)
    assert "| gpt2 | retrograd | 18.00 ms | 0.45x | 0.90x | 0 MiB | 0.38x | 0.75x |" in table
    assert "| llama | retrograd | skipped: budget (killed) |" in table


@pytest.mark.slow
def test_full_smoke_session(tmp_path):
    """Both models under every variant but max-autotune (minutes on a CPU) at smoke
    size, gradient checks included."""
    results, _ = session(tmp_path, timeout=1800)
    assert len(results["runs"]) == 2 * len(gpu_session.ORDER)
    assert all("median_ms" in run for run in results["runs"]), results["runs"]
    assert all(check["passed"] for check in results["gradient_check"])
