"""The dump page's predicted communication timeline (a distributed compile_step).

Two lanes on one time axis, from the report's ``communication`` field (the
schedule pass's prediction, ``passes/planning/collectives.py``): the compute
lane (busy in green, stalled at a wait in red) and the link lane (one bar
per collective, in issue order). A table lists each collective's bytes,
where the schedule issues it and waits for it, and the seconds the compute
hides. All figures are the bandwidth model's predictions, said on the page;
a program without collectives gets no section. Everything is escaped.
"""

from __future__ import annotations

import html

__all__ = ["communication_html"]

LEFT, WIDTH, LANE, GAP = 70, 1100, 26, 10
BUSY, STALL, LINK = "#27ae60", "#c0392b", "#e67e22"


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _us(seconds) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e6:,.2f}"


def _stalls(rows: list[dict]) -> list[tuple[float, float]]:
    """Intervals the compute waits: each collective's exposed tail."""
    return sorted((row["end_seconds"] - row["exposed_seconds"], row["end_seconds"])
                  for row in rows if row["exposed_seconds"])


def _bar(start: float, stop: float, scale: float, top: float, color: str, title: str) -> str:
    x, width = LEFT + start * scale, max(1.0, (stop - start) * scale)
    return (f'<rect x="{x:.1f}" y="{top}" width="{width:.1f}" height="{LANE}" '
            f'fill="{color}" stroke="#fff"><title>{_e(title)}</title></rect>')


def _lanes(summary: dict) -> str:
    rows, total = summary["collectives"], summary["step_seconds"]
    end = max([total] + [row["end_seconds"] for row in rows])
    scale = WIDTH / end if end else 0.0
    link_top = GAP + LANE + GAP
    marks = [f'<text x="4" y="{GAP + 17}">compute</text>',
             f'<text x="4" y="{link_top + 17}">link</text>']
    cursor = 0.0
    for start, stop in _stalls(rows):
        if start > cursor:
            marks.append(_bar(cursor, start, scale, GAP, BUSY, "computing"))
        marks.append(_bar(start, stop, scale, GAP, STALL,
                          f"waiting {_us(stop - start)} us for a collective"))
        cursor = stop
    if total > cursor:
        marks.append(_bar(cursor, total, scale, GAP, BUSY, "computing"))
    for number, row in enumerate(rows):
        marks.append(_bar(row["start_seconds"], row["end_seconds"], scale, link_top, LINK,
                          f"#{number} {row['op']}: {row['bytes']:,} bytes, {_us(row['seconds'])}"
                          f" us, {_us(row['exposed_seconds'])} us exposed"))
    axis = link_top + LANE + GAP + 12
    marks.append(f'<text x="{LEFT}" y="{axis}">0</text>'
                 f'<text x="{LEFT + WIDTH}" y="{axis}" text-anchor="end">'
                 f"{_us(end)} us (predicted)</text>")
    return (f'<svg width="{LEFT + WIDTH + 20}" height="{axis + 6}" '
            f'font-size="12" font-family="sans-serif">{"".join(marks)}</svg>')


def _table(rows: list[dict]) -> str:
    head = ("<tr><th>#</th><th>op</th><th class=n>ranks</th><th class=n>bytes</th>"
            "<th class=n>wire bytes</th><th class=n>issued at kernel</th>"
            "<th class=n>waited at kernel</th><th class=n>kernels between</th>"
            "<th class=n>predicted us</th><th class=n>exposed us</th></tr>")
    body = "".join(
        f"<tr><td>{number}</td><td>{_e(row['op'])}</td><td class=n>{_e(row['ranks'])}</td>"
        f"<td class=n>{row['bytes']:,}</td><td class=n>{_e(row['wire_bytes'])}</td>"
        f"<td class=n>{_e(row['issued_at'])}</td><td class=n>{_e(row['waited_at'])}</td>"
        f"<td class=n>{_e(row['kernels_between'])}</td><td class=n>{_us(row['seconds'])}</td>"
        f"<td class=n>{_us(row['exposed_seconds'])}</td></tr>"
        for number, row in enumerate(rows))
    return f"<table>{head}{body}</table>"


def communication_html(report: dict) -> str:
    """The section, or "" where the report has no collectives."""
    summary = report.get("communication")
    if not summary:
        return ""
    model = summary["model"]
    fraction = summary["overlap_fraction"]
    words = (f"<p>{summary['count']} collectives, {summary['bytes']:,} bytes "
             f"({_e(summary['wire_bytes'])} sent per rank). Predicted, not measured: a ring "
             f"over a link of {model['link_bytes_per_second'] / 1e9:g} GB/s and "
             f"{model['link_latency_seconds'] * 1e6:g} us a step, kernels by a roofline of "
             f"{model['device_flops'] / 1e12:g} TFLOP/s and "
             f"{model['device_bytes_per_second'] / 1e12:g} TB/s (docs/distributed.md). ")
    if summary["step_seconds"] is None:
        words += "The group's size is unknown here, so no times.</p>"
        return f"<h2>Communication</h2>{words}{_table(summary['collectives'])}"
    if fraction is None:
        words += "Nothing crosses the link (one rank).</p>"
        return f"<h2>Communication</h2>{words}{_table(summary['collectives'])}"
    words += (f"The schedule hides {fraction:.0%} of the communication: step "
              f"{_us(summary['step_seconds'])} us against "
              f"{_us(summary['step_seconds_waited_at_once'])} us waiting for each at once.</p>")
    return (f"<h2>Communication: predicted timeline</h2>{words}"
            f'<div class="scroll">{_lanes(summary)}</div>{_table(summary["collectives"])}')
