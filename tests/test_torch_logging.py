"""PyTorch's own tools see retrograd (issue 14 item 3): under ``TORCH_TRACE`` the
trace holds retrograd's artifacts under dynamo's compile id (tlparse's input), and
``TORCH_LOGS=retrograd_passes`` prints one line per pass. Each runs a small model in
a fresh process, since torch reads both variables when it is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MODEL = """
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
# the interpreter: the kernels are Triton sources (the CPU default runs torch calls)
compiled = torch.compile(model, backend="retrograd", options={"executor": "interpret"})
compiled(torch.randn(4, 8)).sum().backward()
print("step done")
"""


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "RETROGRAD_CACHE_DIR": str(tmp_path / "cache"), **env}
    environment.pop("TORCH_LOGS", None) if "TORCH_LOGS" not in env else None
    environment.pop("TORCH_TRACE", None) if "TORCH_TRACE" not in env else None
    script = tmp_path / "model.py"
    script.write_text(MODEL)
    result = subprocess.run([sys.executable, str(script)], env=environment, cwd=tmp_path,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "step done" in result.stdout
    return result


def _records(folder: Path) -> list[dict]:
    """The JSON-lines records of the trace files (each record line, then payload lines
    that start with a tab)."""
    records = []
    for path in folder.glob("*.log"):
        for line in path.read_text().splitlines():
            if line.startswith("\t") or not line.strip():
                continue
            records.append(json.loads(line[line.index("{"):]))
    return records


def test_torch_logs_retrograd_shows_the_logger(tmp_path):
    """TORCH_LOGS=retrograd (a module name torch accepts) prints the INFO lines."""
    result = _run(tmp_path, TORCH_LOGS="retrograd")
    assert "Triton kernels" in result.stderr and "pass fusion" in result.stderr, \
        result.stderr[-3000:]


def _entry_point_installed() -> bool:
    from importlib.metadata import entry_points
    return any(e.name == "retrograd" for e in entry_points(group="torch.backends"))


def test_torch_trace_files_artifacts_under_compile_id(tmp_path):
    trace = tmp_path / "trace"
    _run(tmp_path, TORCH_TRACE=str(trace))
    artifacts = [r for r in _records(trace) if "artifact" in r
                 and r["artifact"]["name"].startswith("retrograd_")]
    names = {r["artifact"]["name"] for r in artifacts}
    assert artifacts, "no retrograd artifact in the trace"
    # every one carries dynamo's compile id, none is filed under "unknown" [-/-]
    assert all("frame_id" in r and "frame_compile_id" in r for r in artifacts), \
        [r for r in artifacts if "frame_id" not in r][:2]
    assert all("stack" not in r for r in artifacts)
    for suffix in ("_00_captured.py", "_program", "_memory_plan", "_report", "_ledger"):
        assert any(name.endswith(suffix) for name in names), (suffix, sorted(names))
    assert any("_kernel_" in name for name in names), sorted(names)
    assert any(name.endswith("-backward_report") for name in names), sorted(names)
    compile_ids = {(r["frame_id"], r["frame_compile_id"]) for r in artifacts}
    dynamo_ids = {(r["frame_id"], r["frame_compile_id"]) for r in _records(trace)
                  if "dynamo_start" in r}
    assert compile_ids <= dynamo_ids, (compile_ids, dynamo_ids)


@pytest.mark.skipif(not _entry_point_installed(),
                    reason="TORCH_LOGS names need the installed torch.backends entry point")
def test_torch_logs_retrograd_passes(tmp_path):
    result = _run(tmp_path, TORCH_LOGS="retrograd_passes,retrograd_memory")
    assert "__retrograd_passes" in result.stderr and ": pass checkpoint:" in result.stderr, \
        result.stderr[-3000:]
    assert "memory plan" in result.stderr, result.stderr[-3000:]


def test_set_logs_after_import(tmp_path):
    """In an uninstalled checkout the names exist once retrograd is imported."""
    import retrograd.torch_logging  # noqa: F401
    from torch._logging._internal import log_registry
    assert log_registry.is_artifact("retrograd_passes")
    assert log_registry.is_artifact("retrograd_memory")

    import logging
    assert logging.getLogger("retrograd").propagate   # the user's logging still sees it
