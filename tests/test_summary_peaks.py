"""``retrograd summary DUMP_DIR`` prints each graph's three peaks (report
schema 4's ``memory.predicted_peak_bytes`` / ``program_peak_bytes`` /
``measured_peak_bytes``), and where the measured one is null, the report's
reason (``measured_peak_note``) at the end of the graph's line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import retrograd
import torch
from retrograd import cli

HEADER = ("predicted peak", "program peak", "measured peak")


def _dump(folder: Path, **options) -> Path:
    torch.manual_seed(0)
    model = retrograd.compile(torch.nn.Linear(4, 3), executor="torch", dump_dir=str(folder),
                              **options)
    model(torch.randn(2, 4)).sum().backward()
    return folder


def _rows(out: str) -> dict[str, str]:
    header, *lines = [line for line in out.splitlines() if line.strip()]
    assert all(title in header for title in HEADER), header
    return {line.split()[0]: line for line in lines}


def _reports(folder: Path) -> dict[str, dict]:
    return {r["graph_id"]: r for r in (json.loads(p.read_text())
                                       for p in folder.glob("*/report.json"))}


def _peak_cells(line: str) -> list[str]:
    """The three peak cells: the columns after ``live bound`` and before ``seconds``."""
    return line.split("  #")[0].split()[6:9]


@pytest.mark.parametrize("verify", [True, False])
def test_summary_prints_the_three_peaks(verify, tmp_path, capsys):
    folder = _dump(tmp_path, verify=verify)
    assert cli.main(["summary", str(folder)]) == 0
    rows, reports = _rows(capsys.readouterr().out), _reports(folder)
    assert set(rows) == set(reports) and len(rows) == 2
    for graph, report in reports.items():
        memory = report["memory"]
        expected = [memory["predicted_peak_bytes"], memory["program_peak_bytes"],
                    memory["measured_peak_bytes"]]
        assert expected[0] > 0 and expected[1] > 0
        assert _peak_cells(rows[graph]) == ["-" if v is None else str(v) for v in expected]
        if verify:
            assert memory["measured_peak_bytes"] > 0 and "#" not in rows[graph]
        else:
            assert memory["measured_peak_bytes"] is None
            assert rows[graph].endswith(f"# {memory['measured_peak_note']}")
            assert "verify=True" in rows[graph]


def test_summary_of_a_report_before_schema_4_says_it_has_no_peaks(tmp_path, capsys):
    folder = _dump(tmp_path / "dump")
    for path in folder.glob("*/report.json"):
        report = json.loads(path.read_text())
        report["schema"] = 3
        for key in ("predicted_peak_bytes", "program_peak_bytes", "measured_peak_bytes",
                    "measured_peak_note"):
            del report["memory"][key]
        path.write_text(json.dumps(report))
    assert cli.main(["summary", str(folder)]) == 0
    for line in _rows(capsys.readouterr().out).values():
        assert _peak_cells(line) == ["-", "-", "-"]
        assert line.endswith("# no peaks in this report (schema 3; they came with schema 4)")
