"""The dump's ``index.html``: one page to debug a compiled graph with.

What it shows, top to bottom: the summary and links; the schedule -- a strip
of kernels (green Triton, orange extern call, grey view) and the memory
series of ``memory_timeline`` drawn under it on one x-axis, the kernel
positions of ``program.py`` -- with the peak marked and the values held
there listed; what the graph saves for its backward (the ledger, grouped as
``retrograd explain`` does, and value by value); the passes; what each stage
changed, as coloured diffs; the files.

Everything that comes from the graph or the user's code (names, source
lines, ops, stats) is escaped: a page must not run what a graph names.
"""

from __future__ import annotations

import difflib
import html
import itertools

from retrograd.comm_timeline import communication_html
from retrograd.explain import ledger_html
from retrograd.memory_timeline import HELD, IN_ARENAS, SERIES, Timeline

__all__ = ["STYLE", "diff_html", "page", "schedule_svg"]

KIND_COLORS = {"triton": "#27ae60", "extern": "#e67e22", "view": "#bdc3c7"}
SERIES_COLORS = {HELD: "#2c3e50", "arenas held": "#2980b9", "arena bytes in use": "#c0392b",
                 "inputs still referenced": "#8e44ad"}
LEFT, STRIP, CHART, AXIS = 78, 46, 190, 30   # margins and band heights of the picture

STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px}
td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}
td.n,th.n{text-align:right}
pre{background:#f6f8fa;padding:8px;overflow:auto}
pre.diff span{display:block}
.add{background:#e6ffec;color:#116329}.del{background:#ffebe9;color:#82071e}
.hunk{color:#6639ba;background:#f3f0ff}.head{font-weight:bold}
.scroll{overflow-x:auto}.key{margin-right:1.2em}"""


def e(value) -> str:
    """Escaped for HTML text and attribute values."""
    return html.escape(str(value), quote=True)


def _x(index: float, width: float) -> float:
    return LEFT + index * width


def _strip(timeline: Timeline, width: float, sources: frozenset[str]) -> list[str]:
    """One box per kernel (views short: they move no data), arcs from the kernels
    whose outputs it reads, each Triton box a link to its source (where the dump
    has one: ``executor="fx"`` generates none)."""
    marks = []
    if len(timeline.steps) <= 600:
        for step in timeline.steps:
            for producer in step.producers:
                a, b = _x(producer + 0.5, width), _x(step.index + 0.5, width)
                lift = min(STRIP - 22, 6 + (b - a) / 8)
                marks.append(f'<path d="M{a:.1f},{STRIP - 20} Q{(a + b) / 2:.1f},'
                             f'{STRIP - 20 - lift:.1f} {b:.1f},{STRIP - 20}" fill="none" '
                             'stroke="#555" stroke-width="0.5" opacity="0.6"/>')
    for step in timeline.steps:
        height = 8 if step.kind == "view" else 18
        box = (f'<rect x="{_x(step.index, width) + 0.5:.1f}" y="{STRIP - 20}" '
               f'width="{max(width - 1, 1):.1f}" height="{height}" '
               f'fill="{KIND_COLORS.get(step.kind, "#999")}"/>')
        if step.name in sources:
            box = f'<a href="kernels/{e(step.name)}.py">{box}</a>'
        marks.append(box)
    return marks


def _scale(top: int):
    return lambda value: STRIP + CHART - value / (top or 1) * (CHART - 12)


def _chart(series: dict[str, list[int]], width: float, top: int) -> list[str]:
    """One step line per series on a shared scale."""
    y = _scale(top)
    marks = []
    for name, values in series.items():
        points = []
        for index, value in enumerate(values):
            points += [f"{_x(index, width):.1f},{y(value):.1f}",
                       f"{_x(index + 1, width):.1f},{y(value):.1f}"]
        marks.append(f'<polyline fill="none" stroke="{SERIES_COLORS.get(name, "#000")}" '
                     f'stroke-width="1.6" points="{" ".join(points)}"/>')
    return marks


def _axes(count: int, width: float, top: int) -> list[str]:
    """Kernel positions under the chart (gridlines through strip and chart) and the bytes."""
    every = max(1, -(-count // 24))
    marks = [(f'<line x1="{LEFT}" y1="{STRIP + CHART}" x2="{_x(count, width):.1f}" '
              f'y2="{STRIP + CHART}" stroke="#333"/>')]
    for index in range(0, count, every):
        x = _x(index + 0.5, width)
        marks.append(f'<line x1="{x:.1f}" y1="4" x2="{x:.1f}" y2="{STRIP + CHART + 4}" '
                     'stroke="#ddd" stroke-width="0.5"/>'
                     f'<text x="{x:.1f}" y="{STRIP + CHART + 16}" font-size="10" '
                     f'text-anchor="middle">{index}</text>')
    marks.append(f'<text x="{_x(count / 2, width):.1f}" y="{STRIP + CHART + 28}" '
                 'font-size="11" text-anchor="middle">kernel position in the schedule '
                 '(program.py\'s # t: blocks)</text>')
    for value in (0, top // 2, top):
        marks.append(f'<text x="{LEFT - 4}" y="{_scale(top)(value) + 4:.1f}" font-size="10" '
                     f'text-anchor="end">{value:,}</text>')
    marks.append(f'<text x="4" y="{STRIP + 10}" font-size="10">bytes</text>'
                 f'<text x="4" y="{STRIP - 8}" font-size="10">kernels</text>')
    return marks


def _peak_marks(timeline: Timeline, width: float, top: int) -> list[str]:
    peak = timeline.peak(HELD)
    if peak is None:
        return []
    index, nbytes = peak
    x, y = _x(index + 0.5, width), _scale(top)(nbytes)
    anchor = "end" if index > len(timeline.steps) / 2 else "start"
    shift = -6 if anchor == "end" else 6
    return [(f'<line x1="{x:.1f}" y1="6" x2="{x:.1f}" y2="{STRIP + CHART}" stroke="#000" '
             'stroke-dasharray="4,3"/>'),
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="none" stroke="#000"/>',
            (f'<text x="{x + shift:.1f}" y="{max(y - 6, STRIP + 10):.1f}" font-size="11" '
             f'text-anchor="{anchor}">peak {nbytes:,} bytes {HELD}, kernel {index} '
             f'{e(timeline.steps[index].name)}</text>')]


def _hover(timeline: Timeline, series: dict[str, list[int]], width: float) -> list[str]:
    """A transparent column per kernel: its name and every series' bytes there."""
    marks = []
    for step in timeline.steps:
        lines = [f"{step.index}: {step.kind} {step.name} ({', '.join(step.nodes)})"]
        lines += [f"{name}: {values[step.index]:,} bytes" for name, values in series.items()]
        marks.append(f'<rect x="{_x(step.index, width):.1f}" y="0" width="{width:.1f}" '
                     f'height="{STRIP + CHART}" fill="transparent"><title>'
                     f'{e(chr(10).join(lines))}</title></rect>')
    return marks


def schedule_svg(timeline: Timeline, sources=frozenset()) -> str:
    """The kernel strip and the memory chart on one x-axis, with the peak marked;
    boxes of the kernels in ``sources`` link to ``kernels/<name>.py``."""
    count = len(timeline.steps)
    if not count:
        return "<p>no kernels</p>"
    series = timeline.series()
    width = max(3.0, min(40.0, 1000 / count))
    top = max(max(values) for values in series.values()) if series else 0
    marks = (_strip(timeline, width, frozenset(sources)) + _chart(series, width, top)
             + _axes(count, width, top) + _peak_marks(timeline, width, top)
             + _hover(timeline, series, width))
    legend = "".join(
        f'<span style="color:{SERIES_COLORS.get(name, "#000")}">&#9632;</span> '
        f'<b>{e(name)}</b> (peak {max(values):,} bytes): {e(SERIES[name])}<br>'
        for name, values in series.items())
    return (f'<div class="scroll"><svg width="{_x(count, width) + 20:.0f}" '
            f'height="{STRIP + CHART + AXIS + 4}" style="background:#fcfcfc">'
            + "".join(marks) + '</svg></div><p class="legend">'
            '<span style="color:#27ae60">&#9632;</span> <span class="key">generated Triton kernel '
            '(click: its source)</span><span style="color:#e67e22">&#9632;</span> '
            '<span class="key">extern aten call</span><span style="color:#bdc3c7">&#9632;'
            '</span> <span class="key">view (moves no data)</span> arcs: a kernel '
            'reads what an earlier one wrote; hover a column for its kernel and bytes.</p>'
            f'<p class="legend">{legend}</p>')


def peak_html(timeline: Timeline) -> str:
    """What is held at the peak: every value of the series there, largest first,
    the planned buffers alive inside each arena, and the total."""
    peak = timeline.peak(HELD)
    if peak is None:
        return ""
    index, nbytes = peak
    step = timeline.steps[index]
    inside = [i for i in timeline.intervals.get(IN_ARENAS, []) if i.covers(index)]
    rows = []
    for interval in timeline.alive_at(index, HELD):
        rows.append(f"<tr><td>{e(interval.name)}</td><td>{e(interval.what)}</td>"
                    f'<td class="n">{interval.nbytes:,}</td><td class="n">{interval.start}'
                    f'</td><td class="n">{interval.stop}</td></tr>')
        if interval.what.startswith("arena"):
            number = interval.name.removeprefix("arena ")
            rows += [f"<tr><td>&nbsp;&nbsp;&#8627; {e(i.name)}</td><td>{e(i.what)}</td>"
                     f'<td class="n">({i.nbytes:,})</td><td class="n">{i.start}</td>'
                     f'<td class="n">{i.stop}</td></tr>'
                     for i in sorted(inside, key=lambda i: -i.nbytes)
                     if i.what.startswith(f"in arena {number} ")]
    return (f"<h3>At the peak: kernel {index}, {e(step.kind)} {e(step.name)}, "
            f"{nbytes:,} bytes {e(HELD)}</h3>"
            "<table><tr><th>value</th><th>what</th><th class=n>bytes</th>"
            "<th class=n>from kernel</th><th class=n>to kernel</th></tr>" + "".join(rows)
            + f'<tr><th>total</th><th></th><th class="n">{nbytes:,}</th><th></th><th></th>'
            "</tr></table><p>Bytes in parentheses are part of their arena's.</p>")


def ledger_values_html(report: dict) -> str:
    """The ledger value by value (what ``retrograd explain --json`` lists)."""
    rows = report.get("ledger")
    if not rows:
        return ""
    body = "".join(
        f"<tr><td>{e(r['name'])}</td><td>{e(r['op'])}</td><td>{e(r['shape'])}</td>"
        f"<td>{e(r['dtype'])}</td><td class=n>{r['bytes']:,}</td><td>{e(r['decision'])}</td>"
        f"<td>{e(r['reason'])}</td><td class=n>{r['recompute_flops']:,}</td>"
        f"<td>{e(r['source'] or '')}</td></tr>" for r in rows)
    return ("<details><summary>value by value</summary><table><tr><th>value</th><th>op</th>"
            "<th>shape</th><th>dtype</th><th class=n>bytes</th><th>decision</th>"
            "<th>reason</th><th class=n>recompute FLOPs</th><th>source</th></tr>"
            f"{body}</table></details>")


def diff_html(old_name: str, old: str, new_name: str, new: str, limit: int = 200_000) -> str:
    """One stage's change as a unified diff, lines coloured by what they are."""
    lines = list(difflib.unified_diff(old.splitlines(), new.splitlines(), old_name, new_name,
                                      n=1, lineterm=""))
    if not lines:
        return f"<p>{e(old_name)} &rarr; {e(new_name)}: no change</p>"
    spans, size = [], 0
    for line in lines:
        kind = ("head" if line.startswith(("---", "+++")) else "hunk" if line.startswith("@@")
                else "add" if line.startswith("+") else "del" if line.startswith("-") else "")
        spans.append(f'<span class="{kind}">{e(line) or "&nbsp;"}</span>')
        size += len(line)
        if size > limit:
            spans.append('<span class="hunk">(cut: the diff goes on; diff the files)</span>')
            break
    added = sum(1 for line in lines[2:] if line.startswith("+"))
    removed = sum(1 for line in lines[2:] if line.startswith("-"))
    return (f"<details><summary>{e(old_name)} &rarr; {e(new_name)} "
            f'(<span class="add">+{added}</span> <span class="del">-{removed}</span>)'
            f'</summary><pre class="diff">{"".join(spans)}</pre></details>')


def _passes_html(report: dict) -> str:
    rows = "".join(
        f"<tr><td>{e(p['name'])}</td><td class=n>{p['nodes_before']}</td>"
        f"<td class=n>{p['nodes_after']}</td><td class=n>{p['seconds']:.4f}</td>"
        f"<td><code>{e(p['stats'])}</code></td></tr>" for p in report["passes"])
    return ("<table><tr><th>pass</th><th class=n>nodes before</th><th class=n>after</th>"
            f"<th class=n>seconds</th><th>stats</th></tr>{rows}</table>")


def _summary(report: dict) -> str:
    kernels, memory = report["kernels"], report["memory"]
    return (f"<p>{report['nodes']['captured']} nodes captured, {report['nodes']['final']} "
            f"final; {kernels['triton']} Triton kernels, {kernels['extern']} extern calls "
            f"{e(kernels['extern_ops'])}, {kernels['views']} views; saved activations "
            f"{e(memory['saved_activation_bytes'])} bytes, arena {e(memory['arena_bytes'])} "
            f"bytes; peak: {e(memory.get('predicted_peak_bytes'))} bytes predicted by the "
            f"checkpoint plan (forward and backward), {e(memory.get('program_peak_bytes'))} "
            f"bytes held by this program at most, {e(memory.get('measured_peak_bytes'))} "
            f"measured ({e(memory.get('measured_peak_note'))}); "
            f"compiled in {e(report['compile_seconds'])} s.</p>"
            '<p><a href="report.json">report.json</a>, <a href="program.py">program.py</a> '
            "(<code>python program.py</code> runs it on random inputs and times each kernel), "
            '<a href="memory_plan.txt">memory_plan.txt</a>, <a href="trace.json">trace.json</a> '
            "(kernel order and memory counters: open it in https://ui.perfetto.dev or "
            "chrome://tracing)</p>")


def page(report: dict, graph_files: list[tuple[str, str]], kernels: list[str],
         timeline: Timeline) -> str:
    """index.html of one graph."""
    diffs = "".join(diff_html(a, old, b, new)
                    for (a, old), (b, new) in itertools.pairwise(graph_files))
    files = "".join(f'<li><a href="{e(name)}">{e(name)}</a></li>' for name, _ in graph_files)
    kernel_links = "".join(f'<li><a href="kernels/{e(k)}.py">{e(k)}</a></li>' for k in kernels)
    title = f"{e(report['graph_id'])} ({e(report['graph'])})"
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>retrograd {e(report['graph_id'])}</title><style>{STYLE}</style></head><body>
<h1>{title}</h1>{_summary(report)}
<h2>The schedule: kernels and memory</h2>{schedule_svg(timeline, kernels)}{peak_html(timeline)}
{communication_html(report)}
<h2>Saved for the backward, by source line</h2>{ledger_html(report)}{ledger_values_html(report)}
<h2>Passes</h2>{_passes_html(report)}
<h2>What each stage changed</h2>{diffs}
<h2>Graph after each stage</h2><ul>{files}</ul>
<h2>Kernels</h2><ul>{kernel_links}</ul>
</body></html>
"""
