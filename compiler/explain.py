"""``retrograd explain DUMP_DIR``: what each graph saves for its backward, by source line.

Reads the ``ledger`` and ``pareto`` fields of the reports in a dump folder
(schema 2; ``compiler/report.py``). The forward and backward reports of one
graph carry the same ledger, so each graph is shown once. ``group`` and
``pareto_rows`` are shared with the dump's ``index.html``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

__all__ = ["explain", "group", "pareto_rows", "ledgers"]

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
    and the totals: saved values and bytes, recomputed values and FLOPs."""
    groups: dict[str | None, dict] = {}
    for row in rows:
        entry = groups.setdefault(row["source"], {
            "source": row["source"], "saved_bytes": 0, "saved": 0, "recomputed": 0,
            "recompute_flops": 0, "ops": []})
        if row["decision"] == "saved":
            entry["saved"] += 1
            entry["saved_bytes"] += row["bytes"]
        else:
            entry["recomputed"] += 1
            entry["recompute_flops"] += row["recompute_flops"]
        op = row["op"].removeprefix("aten.").split(".")[0]
        if op not in entry["ops"]:
            entry["ops"].append(op)
    ordered = sorted(groups.values(), key=lambda g: (-g["saved_bytes"], -g["recompute_flops"],
                                                     g["source"] or ""))
    totals = {key: sum(g[key] for g in ordered)
              for key in ("saved_bytes", "saved", "recomputed", "recompute_flops")}
    return ordered, totals


def pareto_rows(pareto: dict) -> list[dict]:
    """The trade-off's plans by saved bytes, today's plan among them with
    ``current: True`` (a listed plan with its bytes and FLOPs, or its own row)."""
    current = pareto["current"]
    rows = [dict(point, current=False) for point in pareto["points"]]
    same = [row for row in rows if row["saved_bytes"] == current["saved_bytes"]
            and row["recompute_flops"] == current["recompute_flops"]]
    if same:
        same[0]["current"] = True
    else:
        rows.append(dict(current, current=True))
    return sorted(rows, key=lambda row: (row["saved_bytes"], -row["recompute_flops"]))


def _print_ledger(name: str, report: dict) -> None:
    groups, totals = group(report["ledger"])
    print(f"== {name}: {totals['saved']} values saved ({totals['saved_bytes']:,} bytes = "
          f"memory.saved_activation_bytes {report['memory']['saved_activation_bytes']}), "
          f"{totals['recomputed']} recomputed ({totals['recompute_flops']:,} FLOPs)")
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
        note = f"   <- today's plan (memory_budget={row['memory_budget']})" \
            if row["current"] else ""
        print(f"{mark} {str(row['memory_budget']):>13s} {row['saved_bytes']:12,d} "
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
