"""``retrograd explain DUMP_DIR``: what each graph saves for its backward, by source line.

Reads the ``ledger`` and ``pareto`` fields of the reports in a dump folder
(schema 2; ``compiler/report.py``). The forward and backward reports of one
graph carry the same ledger, so each graph is shown once. ``group`` and
``pareto_rows`` are shared with the dump's ``index.html``.
"""

from __future__ import annotations

import html
import json
import os
import sys
from pathlib import Path

__all__ = ["explain", "group", "ledger_html", "ledgers", "pareto_rows", "pareto_svg"]

_HALVES = ("-forward", "-backward", "-step")


def ledgers(dump_dir: Path) -> dict[str, dict]:
    """graph id (without its half) -> the first report in it that has a ledger."""
    found: dict[str, dict] = {}
    for path in sorted(dump_dir.glob("*/report.json")):
        report = json.loads(path.read_text())
        if report.get("ledger") is None:
            continue
        name = report["graph_id"]
        for half in _HALVES:
            name = name.removesuffix(half)
        found.setdefault(name, report)
    return found


def _short(source: str | None) -> str:
    if source is None:
        return "(no source line)"
    try:
        relative = os.path.relpath(source)
    except ValueError:   # another drive on Windows
        return source
    return source if relative.startswith("..") else relative


def group(rows: list[dict]) -> tuple[list[dict], dict]:
    """The ledger by source line, most saved bytes first (then most FLOPs),
    and the totals: saved values and bytes, recomputed values and FLOPs,
    offloaded values and bytes (saved in host memory)."""
    groups: dict[str | None, dict] = {}
    for row in rows:
        entry = groups.setdefault(row["source"], {
            "source": row["source"], "saved_bytes": 0, "saved": 0, "recomputed": 0,
            "recompute_flops": 0, "offloaded": 0, "offloaded_bytes": 0, "ops": []})
        if row["decision"] == "saved":
            entry["saved"] += 1
            entry["saved_bytes"] += row["bytes"]
        elif row["decision"] == "offloaded":
            entry["offloaded"] += 1
            entry["offloaded_bytes"] += row["bytes"]
        else:
            entry["recomputed"] += 1
            entry["recompute_flops"] += row["recompute_flops"]
        op = row["op"].removeprefix("aten.").split(".")[0]
        if op not in entry["ops"]:
            entry["ops"].append(op)
    ordered = sorted(groups.values(), key=lambda g: (-g["saved_bytes"], -g["recompute_flops"],
                                                     g["source"] or ""))
    totals = {key: sum(g[key] for g in ordered)
              for key in ("saved_bytes", "saved", "recomputed", "recompute_flops", "offloaded",
                          "offloaded_bytes")}
    return ordered, totals


def pareto_rows(pareto: dict) -> list[dict]:
    """The trade-off's plans by saved bytes, today's plan among them with
    ``current: True`` (a listed plan with its bytes and FLOPs, or its own row,
    ``frontier: False``)."""
    current = pareto["current"]
    rows = [dict(point, current=False, frontier=True) for point in pareto["points"]]
    same = [row for row in rows if row["saved_bytes"] == current["saved_bytes"]
            and row["recompute_flops"] == current["recompute_flops"]]
    if same:
        same[0]["current"] = True
    else:
        rows.append(dict(current, current=True, frontier=False))
    return sorted(rows, key=lambda row: (row["saved_bytes"], -row["recompute_flops"]))


def _print_ledger(name: str, report: dict) -> None:
    groups, totals = group(report["ledger"])
    print(f"== {name}: {totals['saved']} values saved ({totals['saved_bytes']:,} bytes = "
          f"memory.saved_activation_bytes {report['memory']['saved_activation_bytes']}), "
          f"{totals['recomputed']} recomputed ({totals['recompute_flops']:,} FLOPs)"
          + (f", {totals['offloaded']} offloaded to host memory "
             f"({totals['offloaded_bytes']:,} bytes)" if totals["offloaded"] else ""))
    print(f"{'source':44s} {'saved bytes':>12s} {'saved':>6s} {'recomp':>6s} "
          f"{'recompute FLOPs':>15s}  ops")
    for g in groups:
        print(f"{_short(g['source']):44s} {g['saved_bytes']:12,d} {g['saved']:6d} "
              f"{g['recomputed']:6d} {g['recompute_flops']:15,d}  {', '.join(g['ops'])}")
    print(f"{'total':44s} {totals['saved_bytes']:12,d} {totals['saved']:6d} "
          f"{totals['recomputed']:6d} {totals['recompute_flops']:15,d}")


def _print_pareto(name: str, report: dict) -> None:
    pareto = report.get("pareto")
    if pareto is None:
        print(f"== {name}: no trade-off recorded (it is computed only while dumping)")
        return
    print(f"== {name}: plans memory_budget can pick (predicted peak: activations and "
          "gradients alive at once in the joint graph's order, before fusion)")
    print(f"  {'memory_budget':>13s} {'saved bytes':>12s} {'recompute FLOPs':>15s} "
          f"{'predicted peak':>14s}")
    for row in pareto_rows(pareto):
        mark = "*" if row["current"] else " "
        note = f"   <- today's plan (memory_budget={pareto['current']['memory_budget']})" \
            if row["current"] else ""
        print(f"{mark} {row['memory_budget']!s:>13s} {row['saved_bytes']:12,d} "
              f"{row['recompute_flops']:15,d} {row['predicted_peak_bytes']:14,d}{note}")


def explain(dump_dir: Path, as_json: bool = False, pareto: bool = False) -> int:
    """Print each graph's ledger by source line (or its trade-off), as text or JSON."""
    if not dump_dir.is_dir():
        print(f"retrograd: no such directory: {dump_dir}", file=sys.stderr)
        return 1
    found = ledgers(dump_dir)
    if not found:
        print(f"retrograd: no report with a saved-tensor ledger (schema 2, a graph with "
              f"gradients) under {dump_dir}", file=sys.stderr)
        return 1
    if as_json:
        out = {}
        for name, report in found.items():
            groups, totals = group(report["ledger"])
            out[name] = {"groups": groups, "totals": totals, "ledger": report["ledger"],
                         "pareto": pareto_rows(report["pareto"]) if report.get("pareto")
                         else None}
        print(json.dumps(out, indent=2))
        return 0
    for name, report in found.items():
        (_print_pareto if pareto else _print_ledger)(name, report)
    return 0


# -- the same in the dump's index.html ----------------------------------------------------------

def ledger_html(report: dict) -> str:
    """The ledger by source line as an HTML table, and the trade-off's curve."""
    rows = report.get("ledger")
    if rows is None:
        return "<p>no saved-tensor ledger (no gradients, or no checkpoint pass)</p>"
    groups, totals = group(rows)
    body = "".join(
        f"<tr><td>{html.escape(_short(g['source']))}</td><td>{g['saved_bytes']:,}</td>"
        f"<td>{g['saved']}</td><td>{g['recomputed']}</td><td>{g['recompute_flops']:,}</td>"
        f"<td>{html.escape(', '.join(g['ops']))}</td></tr>" for g in groups)
    table = ("<table><tr><th>source</th><th>saved bytes</th><th>saved</th><th>recomputed</th>"
             f"<th>recompute FLOPs</th><th>ops</th></tr>{body}<tr><th>total</th>"
             f"<th>{totals['saved_bytes']:,}</th><th>{totals['saved']}</th>"
             f"<th>{totals['recomputed']}</th><th>{totals['recompute_flops']:,}</th><th></th>"
             "</tr></table>")
    pareto = report.get("pareto")
    return table + ("" if pareto is None else pareto_svg(pareto_rows(pareto)))


def _scale(values: list[float], size: float):
    top = max(values) or 1
    return lambda value: size - value / top * (size - 10)


def pareto_svg(rows: list[dict], width: int = 480, height: int = 200) -> str:
    """Recompute FLOPs (red) and predicted peak (blue) against saved bytes,
    one dot per plan, today's plan circled."""
    if not rows:
        return "<p>no plans</p>"
    widest = max(r["saved_bytes"] for r in rows) or 1
    marks = []
    for key, color in (("recompute_flops", "#c0392b"), ("predicted_peak_bytes", "#2980b9")):
        y_of = _scale([r[key] for r in rows], height)
        points = [(20 + r["saved_bytes"] / widest * width, y_of(r[key])) for r in rows]
        line = [point for point, row in zip(points, rows) if row["frontier"]]
        marks.append(f'<polyline fill="none" stroke="{color}" points="'
                     + " ".join(f"{x:.1f},{y:.1f}" for x, y in line) + '"/>')
        for (x, y), row in zip(points, rows):
            radius = 6 if row["current"] else 2.5
            fill = "none" if row["current"] else color
            marks.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{radius}" fill="{fill}" '
                         f'stroke="{color}"><title>memory_budget={row["memory_budget"]}: '
                         f'{row["saved_bytes"]:,} bytes saved, {row["recompute_flops"]:,} '
                         f'FLOPs, peak {row["predicted_peak_bytes"]:,}</title></circle>')
    return (f'<svg width="{width + 40}" height="{height + 24}" style="background:#fafafa">'
            + "".join(marks)
            + f'<text x="4" y="{height + 18}" font-size="11">saved bytes: 0 .. '
            f'{max(r["saved_bytes"] for r in rows):,} (left to right)</text></svg>'
            '<p><span style="color:#c0392b">&#9632; recompute FLOPs</span> &nbsp; '
            '<span style="color:#2980b9">&#9632; predicted peak bytes</span> (each on its own '
            'scale); circled: today\'s plan; hover a dot for its memory_budget.</p>')
