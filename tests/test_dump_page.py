"""The dump as a page to debug with (issue 14 item 5): index.html's schedule
picture (kernel strip and memory chart on one axis, the peak named), the
memory series against buffer_reuse's own figures, coloured diffs, the ledger,
``python program.py`` in a fresh process, and ``trace.json`` against the
Chrome trace event format."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import sys
from xml.etree import ElementTree

import jsonschema
import pytest
import retrograd
import torch
import torch.nn.functional as F
from retrograd import dump_page, memory_timeline
from retrograd.dump import Dumper
from retrograd.memory_timeline import HELD
from retrograd.passes import buffer_reuse
from retrograd.program_bench import _device, random_tensor, timed_source

SVG = "{http://www.w3.org/2000/svg}"


class Net(torch.nn.Module):
    """Matrix products (extern), LayerNorm and GELU (Triton), views, an arena."""

    def __init__(self):
        super().__init__()
        self.up, self.norm, self.down = (torch.nn.Linear(16, 32), torch.nn.LayerNorm(32),
                                         torch.nn.Linear(32, 8))

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.norm(self.up(x))))


@pytest.fixture(scope="module")
def dumped(tmp_path_factory):
    """A real dump (Triton kernels in the interpreter) and the programs it was written from."""
    root = tmp_path_factory.mktemp("dumps")
    programs = {}
    finish = Dumper.finish

    def keep(self, report, kernels, text, plan, program):
        programs[report["graph"]] = program
        return finish(self, report, kernels, text, plan, program)
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Dumper, "finish", keep)
        compiled = retrograd.compile(Net(), dump_dir=str(root), executor="interpret")
        compiled(torch.randn(4, 16)).sum().backward()
    folders = {f.name.rsplit("-", 1)[1]: f for f in root.iterdir()}
    return folders, programs


def _svg(index_html: str) -> ElementTree.Element:
    """The schedule picture: the first <svg> of the page."""
    text = re.search(r"<svg.*?</svg>", index_html, re.DOTALL).group(0)
    return ElementTree.fromstring(text.replace("<svg ", '<svg xmlns="http://www.w3.org/2000/svg" ',
                                               1))


@pytest.mark.parametrize("half", ["forward", "backward"])
def test_the_kernel_strip_and_the_memory_chart_share_one_axis(dumped, half):
    folders, programs = dumped
    program = programs[half]
    svg = _svg((folders[half] / "index.html").read_text())
    strip_y = str(dump_page.STRIP - 20)
    boxes = [r for r in svg.iter(f"{SVG}rect") if r.get("y") == strip_y]
    assert len(boxes) == len(program.kernels)                      # views included
    width = float(boxes[1].get("x")) - float(boxes[0].get("x"))
    for index, (box, kernel) in enumerate(zip(boxes, program.kernels)):
        assert float(box.get("x")) == pytest.approx(dump_page.LEFT + index * width + 0.5, abs=0.06)
        assert box.get("fill") == dump_page.KIND_COLORS[str(kernel.kind)]
    links = [a.get("href") for a in svg.iter(f"{SVG}a")]
    assert len(links) == sum(k.kind == "triton" for k in program.kernels)
    assert all((folders[half] / link).is_file() for link in links)   # a click opens the source
    lines = list(svg.iter(f"{SVG}polyline"))
    assert len(lines) == len(memory_timeline.SERIES)
    for line in lines:
        xs = [float(point.split(",")[0]) for point in line.get("points").split()]
        assert xs[0::2] == pytest.approx([dump_page.LEFT + i * width
                                          for i in range(len(program.kernels))], abs=0.06)


@pytest.fixture(scope="module")
def step_program():
    """A training step's program (AdamW: updates written in place over dying slots)."""
    programs = {}
    finish = Dumper.finish

    def keep(self, report, kernels, text, plan, program):
        programs[report["graph"]] = program
        return finish(self, report, kernels, text, plan, program)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Dumper, "finish", keep)
        step = retrograd.compile_step(model, lambda m, x, y: F.cross_entropy(m(x), y),
                                      torch.optim.AdamW(model.parameters(), lr=1e-3),
                                      executor="fx")   # finish runs without a dump folder too
        step(torch.randn(2, 8), torch.tensor([0, 3]))
    return programs["step"]


def _arena_bytes_in_use(program, spans, index: int) -> int:
    """Bytes of the arenas under a live planned buffer, counted byte by byte."""
    used = {(b.arena, byte) for n, b in program.buffers.items() if b.offset is not None
            and spans[n][0] <= index <= spans[n][1]
            for byte in range(b.offset, b.offset + b.nbytes)}
    return len(used)


@pytest.mark.parametrize("half", ["forward", "backward", "step"])
def test_the_memory_series_count_what_they_are_named(dumped, step_program, half):
    program = step_program if half == "step" else dumped[1][half]
    series = memory_timeline.build(program).series()
    spans = buffer_reuse.lifetimes(program)
    arenas, predicted = buffer_reuse.footprint(program, spans)
    assert series[HELD] == predicted
    assert series["arenas held"] == arenas
    count = len(program.kernels)
    assert any(b.offset is not None for b in program.buffers.values()), "no arena"
    # a slot written in place is shared by two buffers at one kernel: counted once
    assert series["arena bytes in use"] == [_arena_bytes_in_use(program, spans, t)
                                            for t in range(count)]
    assert all(used <= held for used, held in zip(series["arena bytes in use"], arenas))
    assert series["inputs still referenced"] == [
        sum(program.buffers[n].nbytes for n in program.inputs if t <= spans[n][1])
        for t in range(count)]
    for name, values in series.items():
        assert all(arena <= value for arena, value in zip(series["arenas held"], series[HELD]))
        assert len(values) == count, name


def test_the_peak_is_marked_and_what_is_held_there_named(dumped):
    folders, programs = dumped
    timeline = memory_timeline.build(programs["backward"])
    index, nbytes = timeline.peak()
    assert nbytes == max(timeline.series()[HELD])
    alive = timeline.alive_at(index)
    assert sum(i.nbytes for i in alive) == nbytes
    page = (folders["backward"] / "index.html").read_text()
    assert f"At the peak: kernel {index}, " in page and f"{nbytes:,} bytes held by the program" \
        in page
    table = page[page.index("At the peak"):page.index("Saved for the backward")]
    for interval in alive:
        assert f"<td>{interval.name}</td>" in table
    dashed = [line for line in _svg(page).iter(f"{SVG}line") if line.get("stroke-dasharray")]
    assert len(dashed) == 1
    boxes = [r for r in _svg(page).iter(f"{SVG}rect") if r.get("y") == str(dump_page.STRIP - 20)]
    box = boxes[index]
    assert float(dashed[0].get("x1")) == pytest.approx(
        float(box.get("x")) + float(box.get("width")) / 2, abs=0.6)


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="needs a headless browser (apt-get install chromium)")
def test_a_real_browser_draws_the_page(dumped, tmp_path):
    """Debian's chromium, headless: the DOM it builds has every kernel box, the
    peak line and no script, and it paints a screenshot."""
    folders, programs = dumped
    uri = (folders["backward"] / "index.html").as_uri()
    browser = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run(browser + ["--dump-dom", uri], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    svg = dom[dom.index("<svg"):dom.index("</svg>")]
    boxes = re.findall(rf'<rect[^>]*y="{dump_page.STRIP - 20}"', svg)
    assert len(boxes) == len(programs["backward"].kernels)
    assert "stroke-dasharray" in svg and "<script" not in dom
    shot = tmp_path / "page.png"
    subprocess.run(browser + [f"--screenshot={shot}", "--window-size=1200,900", uri],
                   capture_output=True, timeout=120, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_the_page_shows_the_ledger_and_coloured_diffs(dumped):
    folders, _ = dumped
    page = (folders["forward"] / "index.html").read_text()
    report = json.loads((folders["forward"] / "report.json").read_text())
    assert "Saved for the backward, by source line" in page and "value by value" in page
    for row in report["ledger"]:
        assert f"<td>{row['name']}</td>" in page
    assert re.search(r'<span class="add">\+', page) and re.search(r'<span class="del">-', page)
    assert '<span class="hunk">@@' in page


def test_a_diff_colours_each_line_by_what_it_is():
    text = dump_page.diff_html("a.py", "x = 1\ny = 2\nz = <3>\n", "b.py", "x = 1\ny = 5\n")
    assert '<span class="del">-y = 2</span>' in text and '<span class="add">+y = 5</span>' \
        in text and '<span class="del">-z = &lt;3&gt;</span>' in text
    assert "(<span class=\"add\">+1</span> <span class=\"del\">-2</span>)" in text
    assert "no change" in dump_page.diff_html("a.py", "x\n", "b.py", "x\n")


TRACE_SCHEMA = {
    "type": "object", "required": ["traceEvents"],
    "properties": {
        "displayTimeUnit": {"enum": ["ms", "ns"]},
        "otherData": {"type": "object"},
        "traceEvents": {"type": "array", "items": {
            "type": "object", "required": ["ph", "name", "pid"],
            "properties": {
                "ph": {"enum": ["X", "C", "i", "M"]}, "name": {"type": "string"},
                "cat": {"type": "string"}, "pid": {"type": "integer"},
                "tid": {"type": "integer"}, "ts": {"type": "number", "minimum": 0},
                "dur": {"type": "number", "minimum": 0}, "args": {"type": "object"},
                "s": {"enum": ["g", "p", "t"]}},
            "allOf": [
                {"if": {"properties": {"ph": {"const": "X"}}},
                 "then": {"required": ["ts", "dur", "tid"]}},
                {"if": {"properties": {"ph": {"const": "C"}}},
                 "then": {"required": ["ts", "args"], "properties": {"args": {
                     "minProperties": 1, "additionalProperties": {"type": "number"}}}}},
                {"if": {"properties": {"ph": {"const": "i"}}}, "then": {"required": ["ts"]}},
                {"if": {"properties": {"ph": {"const": "M"}}},
                 "then": {"required": ["args"], "properties": {
                     "name": {"enum": ["process_name", "thread_name", "process_sort_index",
                                       "thread_sort_index"]},
                     "args": {"required": ["name"]}}}},
            ]}},
    },
}


def test_trace_json_is_a_chrome_trace_of_the_schedule_and_memory(dumped):
    folders, programs = dumped
    program = programs["backward"]
    trace = json.loads((folders["backward"] / "trace.json").read_text())
    jsonschema.validate(trace, TRACE_SCHEMA)
    kernels = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert [e["name"] for e in kernels] == [k.name for k in program.kernels]
    assert [e["ts"] for e in kernels] == sorted(e["ts"] for e in kernels)
    timeline = memory_timeline.build(program)
    for name, values in timeline.series().items():
        samples = [e["args"]["bytes"] for e in trace["traceEvents"]
                   if e["ph"] == "C" and e["name"] == name]
        assert samples == values + [0], name
    [peak] = [e for e in trace["traceEvents"] if e["ph"] == "i"]
    assert peak["args"]["bytes"] == timeline.peak()[1] == sum(peak["args"]["held"].values())


def test_program_py_runs_alone_on_random_inputs_and_times_each_kernel(dumped, tmp_path):
    folders, programs = dumped
    folder = folders["backward"]
    out = tmp_path / "measured.json"
    result = subprocess.run([sys.executable, "program.py", "--repeat", "1", "--trace", str(out)],
                            cwd=folder, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    rows = {int(m.group(1)): (m.group(2), m.group(3)) for m in re.finditer(
        r"^ +(\d+)  (\w+) +(\S+) +(\d+\.\d{3}) +\d+\.\d%$", result.stdout, re.MULTILINE)}
    program = programs["backward"]
    assert rows == {i: (str(k.kind), k.name) for i, k in enumerate(program.kernels)}
    assert "whole program:" in result.stdout
    measured = json.loads(out.read_text())
    jsonschema.validate(measured, TRACE_SCHEMA)
    spans = [e for e in measured["traceEvents"] if e["ph"] == "X"]
    triton = [e["dur"] for e in spans if e["cat"] == "triton"]
    assert triton and all(duration > 0 for duration in triton)
    for before, after in itertools.pairwise(spans):
        assert after["ts"] == pytest.approx(before["ts"] + before["dur"])


def test_program_py_says_why_it_cannot_run():
    with pytest.raises(SystemExit, match="executor='fx'"):
        _device("fx")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA"):
            _device("triton")


def test_the_timed_program_ticks_before_each_kernel_block():
    source = ("def run(args, kernels, rt):\n    x, = args\n\n    arena = rt.arena(8)\n"
              "    # 0: triton k0 (a, b)\n    y = x\n\n    # 1: view v (c)\n    z = y\n"
              "    return [z]\n")
    lines = timed_source(source).splitlines()
    assert lines[3:5] == ["    _tick(0)", "    arena = rt.arena(8)"]
    assert lines[lines.index("    # 1: view v (c)") - 1] == "    _tick(1)"
    assert lines[-2:] == ["    _tick(None)", "    return [z]"]


def test_under_torch_trace_the_chrome_trace_is_an_artifact(step_program, monkeypatch):
    """tlparse lists it beside the other texts (issue 14 item 3's artifacts)."""
    from retrograd import dump
    sent = {}
    monkeypatch.setattr(dump, "tracing", lambda: True)
    monkeypatch.setattr(dump, "trace", lambda name, payload, encoding="string":
                        sent.__setitem__(name, (payload(), encoding)))
    report = {"graph_id": "g1-step", "passes": [], "ledger": None}
    Dumper(None, ["g1-step"]).finish(report, {}, "def run(): pass\n", "plan\n", step_program)
    text, encoding = sent["retrograd_g1-step_chrome_trace"]
    assert encoding == "json"
    jsonschema.validate(json.loads(text), TRACE_SCHEMA)
    assert sent["retrograd_g1-step_program"] == ("def run(): pass\n", "string")


@pytest.mark.parametrize("dtype", ["float32", "int64", "bool"])
def test_random_inputs_take_any_recorded_layout(dtype):
    """An expanded input (stride 0) repeats elements: in-place random fills refuse
    such a tensor, so the storage is filled and viewed."""
    value = random_tensor((4, 3, 2), (0, 1, 3), dtype, torch.device("cpu"))
    assert value.shape == (4, 3, 2) and value.stride() == (0, 1, 3)
    assert str(value.dtype) == f"torch.{dtype}"
    if dtype == "int64":
        assert set(value.unique().tolist()) <= {0, 1}
    assert random_tensor((0, 5), (5, 1), dtype, torch.device("cpu")).shape == (0, 5)
