"""The ``retrograd`` command line: look at dumps and at what codegen covers.

    retrograd summary DUMP_DIR   one line per compiled graph in a dump folder (or one graph's)
    retrograd ops                every aten op lowered into Triton kernels
    retrograd cache info         the kernel cache: folder, files, bytes, cap, oldest/newest
    retrograd cache clear        delete retrograd's files from the kernel cache
    retrograd env                versions and machine, to paste into a bug report
    retrograd minify REPRO       shrink a repro.py to the fewest nodes that fail the same way
    retrograd --version          retrograd's version
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["main"]


def summary(dump_dir: Path) -> int:
    """One line per graph: a dump folder's graph folders, or one graph folder itself.
    A graph whose measured peak is null ends its line with the report's reason."""
    if not dump_dir.is_dir():
        print(f"retrograd: no such directory: {dump_dir}", file=sys.stderr)
        return 1
    reports = sorted(dump_dir.glob("*/report.json")) or sorted(dump_dir.glob("report.json"))
    if not reports:
        print(f"retrograd: no report.json under {dump_dir}", file=sys.stderr)
        return 1
    print(f"{'graph':28s} {'nodes':>11s} {'triton':>7s} {'extern':>7s} {'saved bytes':>12s} "
          f"{'live bound':>11s} {'predicted peak':>14s} {'program peak':>12s} "
          f"{'measured peak':>13s} {'seconds':>8s}")
    for path in reports:
        report = json.loads(path.read_text())
        nodes = f"{report['nodes']['captured']}->{report['nodes']['final']}"
        memory = report["memory"]
        predicted, program, measured, note = _peaks(report)
        line = (f"{report['graph_id']:28s} {nodes:>11s} {report['kernels']['triton']:7d} "
                f"{report['kernels']['extern']:7d} {memory['saved_activation_bytes']!s:>12s} "
                f"{memory['live_lower_bound_bytes']!s:>11s} {predicted:>14s} {program:>12s} "
                f"{measured:>13s} {report['compile_seconds']:8.2f}")
        print(f"{line}  # {note}" if note else line)
    return 0


def _peaks(report: dict) -> tuple[str, str, str, str | None]:
    """The report's three peaks as cells ("-" where null), and why the
    measured one is missing (its ``measured_peak_note``); for a symbolic
    program's measured peaks, the size hints they are at; else None."""
    memory = report["memory"]
    if "measured_peak_bytes" not in memory:
        return "-", "-", "-", (f"no peaks in this report (schema {report.get('schema')}; "
                               f"they came with schema 4)")

    def cell(key: str) -> str:
        return "-" if memory.get(key) is None else str(memory[key])
    measured, sizes = memory["measured_peak_bytes"], memory.get("peak_sizes")
    note = memory.get("measured_peak_note") if measured is None else None
    if measured is not None and sizes:   # a symbolic program's: measured at its size hints
        note = "peaks at the size hints (" + ", ".join(f"{k}={v}" for k, v in sizes.items()) + ")"
    return (cell("predicted_peak_bytes"), cell("program_peak_bytes"), cell("measured_peak_bytes"),
            note)


def list_ops() -> int:
    from retrograd.codegen import lowered_ops
    for family, names in lowered_ops().items():
        print(f"## {family}")
        for name in names:
            print(name)
    return 0


def _when(mtime: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(mtime))


def cache_info() -> int:
    """Print where the kernel cache is, what it holds and its cap."""
    from retrograd.runtime import disk_cache
    from retrograd.runtime.loader import cache_dir
    folder = cache_dir()
    files = disk_cache.cache_files(folder)
    cap = disk_cache.max_bytes()
    print(f"folder  {folder}")
    print(f"files   {len(files)}")
    print(f"bytes   {sum(file.size for file in files):,}")
    print(f"cap     {'none' if cap is None else f'{cap:,}'} bytes "
          f"({disk_cache.ENVIRONMENT}, least recently used evicted past it)")
    if files:
        print(f"oldest  {_when(files[0].mtime)}  {files[0].path.name}")
        print(f"newest  {_when(files[-1].mtime)}  {files[-1].path.name}")
    return 0


def cache_clear(verbose: bool) -> int:
    """Delete retrograd's files from the kernel cache; print what went."""
    from retrograd.runtime import disk_cache
    from retrograd.runtime.loader import cache_dir
    folder = cache_dir()
    removed = disk_cache.clear(folder)
    if verbose:
        for file in removed:
            print(f"removed {file.path}")
    print(f"retrograd: removed {len(removed)} files ({sum(f.size for f in removed):,} bytes) "
          f"from {folder}")
    return 0


def _cache(args) -> int:
    try:
        return cache_info() if args.action == "info" else cache_clear(args.verbose)
    except (PermissionError, ValueError) as error:   # an unsafe folder, a bad cap
        print(error, file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    from retrograd import __version__
    parser = argparse.ArgumentParser(prog="retrograd", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"retrograd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    summary_parser = commands.add_parser("summary", help="summarize the reports in a dump folder")
    summary_parser.add_argument("dump_dir", type=Path)
    explain_parser = commands.add_parser(
        "explain", help="the saved-tensor ledger of each graph, by source line")
    explain_parser.add_argument("dump_dir", type=Path)
    explain_parser.add_argument("--json", action="store_true", help="print JSON")
    explain_parser.add_argument("--pareto", action="store_true",
                                help="saved bytes, recompute FLOPs and predicted peak of the "
                                     "plans memory_budget can pick, today's marked")
    commands.add_parser("ops", help="list the aten ops codegen lowers into Triton")
    cache_parser = commands.add_parser("cache", help="look at or clear the kernel cache "
                                                     "(RETROGRAD_CACHE_DIR)")
    cache_parser.add_argument("action", choices=("info", "clear"))
    cache_parser.add_argument("-v", "--verbose", action="store_true",
                              help="clear: print every file removed")
    commands.add_parser("env", help="print versions and machine for a bug report")
    minify_parser = commands.add_parser(
        "minify", help="shrink a repro.py (written on a failed compile) to the fewest nodes "
                       "that still fail the same way; writes repro_minified.py beside it")
    minify_parser.add_argument("repro", type=Path)
    minify_parser.add_argument("-o", "--output", type=Path, help="where to write the result")
    minify_parser.add_argument("--max-tries", type=int, default=300,
                               help="at most this many compiles of candidate graphs")
    args = parser.parse_args(argv)
    if args.command == "summary":
        return summary(args.dump_dir)
    if args.command == "explain":
        from retrograd.explain import explain
        return explain(args.dump_dir, args.json, args.pareto)
    if args.command == "cache":
        return _cache(args)
    if args.command == "minify":
        from retrograd.minify import main as minify
        return minify(args.repro, args.output, args.max_tries)
    if args.command == "env":
        from retrograd.environment import describe
        print(describe())
        return 0
    return list_ops()
