"""The docs stay true to the code."""

import re
from pathlib import Path

from retrograd.codegen.ops import lowered_op_names

ROOT = Path(__file__).resolve().parents[1]


def test_ops_doc_lists_exactly_the_lowered_ops():
    listed = re.findall(r"^- `([^`]+)`$", (ROOT / "docs" / "ops.md").read_text(), re.M)
    assert listed == lowered_op_names()


def test_readme_starts_with_the_two_commands():
    head = (ROOT / "README.md").read_text().splitlines()[:12]
    text = "\n".join(head)
    assert "examples/quickstart.py" in text
    assert "python -m pytest" in text


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^(python -m pytest[^\n`]*)$", readme, re.M).group(1).strip()
    assert command in (ROOT / ".ci" / "run").read_text()
