"""The dump folder: what each pass did, readable and diffable.

``<dump_dir>/<graph_id>/`` holds the graph after every pass as Python (fx's
own code printing, so ``diff 02_cleanup.py 03_checkpoint.py`` shows what a
pass did), each kernel's Triton source, ``program.py`` (``python program.py``
times it on random inputs: ``program_bench.py``), ``memory_plan.txt``,
``report.json``, ``trace.json`` (a Chrome trace of the kernel order and the
memory timeline: ``perfetto.py``) and ``index.html`` (``dump_page.py``).
Files are written only when dumping is on; the dumper is a no-op otherwise
so passes never check. Under
``TORCH_TRACE`` the same texts also go to torch's structured trace as
artifacts named ``retrograd_<graph id>_<file>`` (tlparse lists them under the
compile id), whether or not a dump folder is set.

``dump_dir`` may be a shared folder and graph ids are predictable, so no
write follows a link: a graph folder is used only if it is a real folder of
ours that no one else can write (else a fresh one is made next to it, with a
warning), every file is written to a new temporary file (``O_EXCL``,
``O_NOFOLLOW``) opened relative to that folder and renamed over the name,
which replaces a planted link itself, never its target. A dump that cannot
be written is a warning, never a failed compile.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import tempfile
import warnings
from pathlib import Path
from typing import Any

from retrograd import memory_timeline
from retrograd.dump_page import page
from retrograd.ir import Program
from retrograd.perfetto import chrome_trace
from retrograd.program_bench import main_block
from retrograd.report import to_json
from retrograd.runtime.loader import ours_alone
from retrograd.torch_logging import trace, tracing
from torch import fx

__all__ = ["Dumper", "count_nodes", "memory_plan_text", "subject_text"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0)
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)


def _graph_folder(root: Path, graph_id: str) -> Path:
    """``root/graph_id`` if it is (or is now made) a folder of ours only we can
    write; else a fresh folder ``root/graph_id-XXXX``, with one warning."""
    root.mkdir(parents=True, exist_ok=True)
    folder = root / graph_id
    try:
        os.mkdir(folder, 0o755)
    except FileExistsError:
        pass
    try:
        if ours_alone(os.lstat(folder), stat.S_ISDIR):
            return folder
    except OSError:
        pass
    fresh = Path(tempfile.mkdtemp(prefix=f"{graph_id}-", dir=root))
    warnings.warn(f"retrograd: dump folder {folder} is a link, another user's or writable by "
                  f"others; not writing there, dumping to {fresh} instead", RuntimeWarning,
                  stacklevel=3)
    return fresh


def _folder_or_warn(root: Path, graph_id: str) -> Path | None:
    """The graph's folder, or ``None`` with a warning when none can be made."""
    try:
        return _graph_folder(root, graph_id)
    except OSError as error:
        warnings.warn(f"retrograd: cannot make a dump folder for {graph_id} in {root} "
                      f"({error}); not dumping it", RuntimeWarning, stacklevel=3)
        return None


def _open_folder(name, parent: int | None = None, create: bool = False) -> int:
    """A descriptor of a folder of ours, opened without following a link."""
    if create:
        try:
            os.mkdir(name, 0o755, dir_fd=parent)
        except FileExistsError:
            pass
    handle = os.open(name, _DIR_FLAGS, dir_fd=parent)
    if not ours_alone(os.fstat(handle), stat.S_ISDIR):
        os.close(handle)
        raise PermissionError(f"{name} is not a folder of yours that only you can write")
    return handle


def _replace_in(folder: int, name: str, data: bytes) -> None:
    """Write ``name`` in the folder ``folder`` through a new temporary file and a rename."""
    temporary = f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    handle = os.open(temporary, _NEW_FILE_FLAGS, 0o644, dir_fd=folder)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, name, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        try:
            os.unlink(temporary, dir_fd=folder)
        except OSError:
            pass
        raise


def safe_write(folder: Path, relative: str, text: str) -> None:
    """Write ``folder/relative`` creating subfolders, following no link anywhere below
    ``folder`` (``folder`` itself included)."""
    *subfolders, name = Path(relative).parts
    handle = _open_folder(folder)
    try:
        for part in subfolders:
            child = _open_folder(part, handle, create=True)
            os.close(handle)
            handle = child
        _replace_in(handle, name, text.encode("utf-8"))
    finally:
        os.close(handle)


class Dumper:
    """Writes one graph's dump files; the same files into every folder it serves."""

    def __init__(self, root: str | None, graph_ids: list[str], counter: int = 0):
        self.by_id: dict[str, Path] = {}               # graph id -> its folder, if one was made
        for graph_id in graph_ids if root else []:
            folder = _folder_or_warn(Path(root), graph_id)
            if folder is not None:
                self.by_id[graph_id] = folder
        self.counter = counter
        self.label = _label(graph_ids)                 # artifact names in the torch trace
        self.graph_files: list[tuple[str, str]] = []   # (file name, text)
        self.failed: set[Path] = set()                 # folders already warned about

    @property
    def folders(self) -> list[Path]:
        return list(self.by_id.values())

    @property
    def enabled(self) -> bool:
        return bool(self.by_id)

    def fork(self, graph_id: str, root: str | None) -> Dumper:
        """A dumper for one half that continues this one's numbering and history
        (and its folder for that graph id, if it already has one)."""
        folder = self.by_id.get(graph_id)
        child = Dumper(root if folder is None else None, [graph_id], self.counter)
        if folder is not None:
            child.by_id = {graph_id: folder}
        child.graph_files = list(self.graph_files)
        return child

    def write(self, relative: str, text: str) -> None:
        """Write one file into every folder; a failure warns once per folder."""
        for folder in self.folders:
            if folder in self.failed:
                continue
            try:
                safe_write(folder, relative, text)
            except OSError as error:
                self.failed.add(folder)
                warnings.warn(f"retrograd: cannot write the dump file {folder / relative} "
                              f"({error}); no more dump files go to {folder}", RuntimeWarning,
                              stacklevel=2)

    def stage(self, name: str, text: str, suffix: str = ".py") -> None:
        """The graph after a stage, as ``NN_<name>.py``."""
        file_name = f"{self.counter:02d}_{name}{suffix}"
        self.counter += 1
        self.graph_files.append((file_name, text))
        self.write(file_name, text)
        trace(f"retrograd_{self.label}_{file_name}", lambda: text)

    def finish(self, report: dict, kernels: dict[str, str], program_text: str, plan: str,
               program: Program) -> None:
        """Write the final files: kernels, ``program.py`` (with a main that times it
        on random inputs: ``program_bench.py``), the memory plan, the report,
        ``trace.json`` (``perfetto.py``) and ``index.html`` (``dump_page.py``)."""
        if tracing():
            self._trace_final(report, kernels, program_text, plan, program)
        if not self.enabled:
            return
        for name, source in kernels.items():
            self.write(f"kernels/{name}.py", source)
        self.write("program.py", program_text + main_block(program, _executor(report)))
        self.write("memory_plan.txt", plan)
        self.write("report.json", to_json(report))
        timeline = memory_timeline.build(program)
        self.write("trace.json", json.dumps(chrome_trace(
            report["graph_id"], timeline, report.get("communication"))) + "\n")
        self.write("index.html", page(report, self.graph_files, sorted(kernels), timeline))

    def _trace_final(self, report: dict, kernels: dict[str, str], program_text: str,
                     plan: str, program: Program) -> None:
        """The final texts as structured-trace artifacts (``TORCH_TRACE`` is on),
        ``trace.json`` among them as ``..._chrome_trace``."""
        prefix = f"retrograd_{self.label}"
        for name, source in kernels.items():
            trace(f"{prefix}_kernel_{name}", lambda source=source: source)
        trace(f"{prefix}_program", lambda: program_text)
        trace(f"{prefix}_chrome_trace", lambda: json.dumps(
            chrome_trace(report["graph_id"], memory_timeline.build(program),
                         report.get("communication"))), encoding="json")
        trace(f"{prefix}_memory_plan", lambda: plan)
        trace(f"{prefix}_report", lambda: to_json(report), encoding="json")
        if report.get("ledger") is not None:
            trace(f"{prefix}_ledger", lambda: to_json(report["ledger"]), encoding="json")


def _executor(report: dict) -> str:
    """The executor codegen chose ("triton", "interpret" or "fx"), from its pass record."""
    for record in report["passes"]:
        if record["name"] == "codegen":
            return record["stats"].get("executor", "fx")
    return "fx"


def _label(graph_ids: list[str]) -> str:
    """One name for the graphs a dumper serves: the id itself, or the joint
    stage's shared prefix (``g1234abcd`` of ``g1234abcd-forward`` and ``-backward``)."""
    if len(graph_ids) == 1:
        return graph_ids[0]
    return os.path.commonprefix(graph_ids).rstrip("-") or "graph"


# -- what the files say ------------------------------------------------------------------------

def count_nodes(subject: Any) -> int:
    """Nodes of a graph, of both halves, or covered by a program's kernels."""
    if isinstance(subject, fx.GraphModule):
        return len(subject.graph.nodes)
    if isinstance(subject, tuple):
        return sum(count_nodes(part) for part in subject)
    if isinstance(subject, Program):
        return sum(len(kernel.nodes) for kernel in subject.kernels)
    return 0


def subject_text(subject: Any) -> str:
    """A pass's subject as the dump shows it: fx's Python, both halves, or the program."""
    if isinstance(subject, fx.GraphModule):
        return subject.print_readable(print_output=False, include_stride=True)
    if isinstance(subject, tuple):
        return "\n\n".join(f"# ---- {label} ----\n{subject_text(part)}"
                            for label, part in zip(("forward", "backward"), subject))
    return subject.describe()


def memory_plan_text(program: Program) -> str:
    """memory_plan.txt: every buffer's role, bytes, lifetime and arena place."""
    lines = [(f"# memory plan of {program.name}: buffer, role, bytes, first use, last use, "
              "arena, offset"),
             (f"{'buffer':32s} {'role':10s} {'bytes':>12s} {'first':>6s} {'last':>6s} "
              f"{'arena':>5s} offset")]
    for buffer in program.buffers.values():
        lines.append(f"{buffer.name:32s} {buffer.role:10s} {buffer.nbytes:12d} "
                     f"{buffer.first_use!s:>6s} {buffer.last_use!s:>6s} "
                     f"{buffer.arena!s:>5s} {buffer.offset}")
    lines.append("")
    lines.append("# arenas: one per window of the schedule (kernels start..stop), "
                 "taken before start and given back after stop")
    for number, window in enumerate(program.arenas):
        lines.append(f"# arena {number}: kernels {window.start}..{window.stop}, "
                     f"{window.nbytes} bytes, {window.strategy}")
    return "\n".join(lines) + "\n"
