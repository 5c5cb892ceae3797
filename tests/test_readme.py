"""The README's Python snippets run as written.

Each ```python block of README.md is written to a file and run in a fresh
temporary folder (so dumps it writes land there), in this process. A block
that truly cannot run on a CPU-only machine carries the marker
``<!-- not run: reason -->`` on the line before its fence, visible in the
README's source; the test lists it as skipped with that reason.
"""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(?:<!-- not run: (?P<reason>[^>]*) -->\n)?```python\n(?P<code>.*?)^```",
                   re.DOTALL | re.MULTILINE)


def blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(line, code, reason not run or None) for each ```python block of ``text``."""
    return [(text.count("\n", 0, match.start("code")) + 1, match.group("code"),
             match.group("reason")) for match in BLOCK.finditer(text)]


README_BLOCKS = blocks((ROOT / "README.md").read_text())


def test_the_readme_has_python_blocks_and_the_parser_finds_markers():
    assert README_BLOCKS
    found = blocks("<!-- not run: needs CUDA -->\n```python\nx = 1\n```\n```python\ny = 2\n```\n")
    assert found == [(3, "x = 1\n", "needs CUDA"), (6, "y = 2\n", None)]


@pytest.mark.parametrize("line, code, reason", README_BLOCKS,
                         ids=[f"README.md:{line}" for line, _, _ in README_BLOCKS])
def test_readme_block_runs(line, code, reason, tmp_path, monkeypatch):
    if reason is not None:
        pytest.skip(f"README.md:{line} marked not run: {reason}")
    monkeypatch.chdir(tmp_path)
    script = tmp_path / f"readme_line_{line}.py"
    script.write_text(code)
    torch._dynamo.reset()
    torch.manual_seed(0)
    runpy.run_path(str(script), run_name="__main__")


FIGURE = re.compile(r"(\d+(?:\.\d+)?)(?:-(\d+(?:\.\d+)?))?\s*(?:ms|MiB|x\b|times)")


def test_should_i_use_it_quotes_only_measured_figures():
    """Every time, memory or ratio in the README's "Should I use it?" section
    is one BENCHMARKS.md records (with its date, machine and commit there)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Should I use it?\n", 1)[1].split("\n## ", 1)[0]
    benchmarks = (ROOT / "BENCHMARKS.md").read_text()
    figures = [number for match in FIGURE.finditer(section) for number in match.groups()
               if number]
    assert len(figures) >= 10, figures
    for number in figures:
        assert re.search(rf"(?<![\d.]){re.escape(number)}(?![\d])", benchmarks), number
