"""The ``retrograd`` command line: look at dumps and at what codegen covers.

    retrograd summary DUMP_DIR   one line per compiled graph in a dump folder
    retrograd ops                every aten op lowered into Triton kernels
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main"]


def summary(dump_dir: Path) -> int:
    reports = sorted(dump_dir.glob("*/report.json"))
    if not reports:
        print(f"retrograd: no report.json under {dump_dir}", file=sys.stderr)
        return 1
    print(f"{'graph':28s} {'nodes':>11s} {'triton':>7s} {'extern':>7s} {'saved bytes':>12s} "
          f"{'live bound':>11s} {'seconds':>8s}")
    for path in reports:
        report = json.loads(path.read_text())
        nodes = f"{report['nodes']['captured']}->{report['nodes']['final']}"
        memory = report["memory"]
        print(f"{report['graph_id']:28s} {nodes:>11s} {report['kernels']['triton']:7d} "
              f"{report['kernels']['extern']:7d} {str(memory['saved_activation_bytes']):>12s} "
              f"{str(memory['live_lower_bound_bytes']):>11s} {report['compile_seconds']:8.2f}")
    return 0


def list_ops() -> int:
    from retrograd.codegen import lowered_ops
    for family, names in lowered_ops().items():
        print(f"## {family}")
        for name in names:
            print(name)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="retrograd", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    summary_parser = commands.add_parser("summary", help="summarize the reports in a dump folder")
    summary_parser.add_argument("dump_dir", type=Path)
    commands.add_parser("ops", help="list the aten ops codegen lowers into Triton")
    args = parser.parse_args(argv)
    if args.command == "summary":
        return summary(args.dump_dir)
    return list_ops()
