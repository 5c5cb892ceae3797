"""The docs stay true to the code."""

import re
from pathlib import Path

from retrograd.codegen import lowered_ops

ROOT = Path(__file__).resolve().parents[1]


def test_ops_doc_lists_exactly_the_lowered_ops():
    text = (ROOT / "docs" / "ops.md").read_text()
    for family, names in lowered_ops().items():
        section = text.split(f"## {family}\n", 1)[1].split("\n## ", 1)[0]
        assert re.findall(r"^- `([^`]+)`$", section, re.M) == names, family


def test_readme_starts_with_the_two_commands():
    head = (ROOT / "README.md").read_text().splitlines()[:12]
    text = "\n".join(head)
    assert "examples/quickstart.py" in text
    assert "python -m pytest" in text


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^(python -m pytest[^\n`]*)$", readme, re.M).group(1).strip()
    assert command in (ROOT / ".ci" / "run").read_text()
