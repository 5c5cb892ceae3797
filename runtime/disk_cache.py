"""The kernel cache folder's files: listing, a size cap with least recently
used eviction, and clearing (``retrograd cache info|clear``).

Every generated file is named ``<stem>_<24 hex digits>.py`` (loader.py), so
the folder can grow forever: one file per kernel and program ever compiled.
``RETROGRAD_CACHE_MAX_MB`` (default 1024; 0 turns the cap off) caps its
size. A file's mtime is its last use: the loader sets it when it reuses a
file (once per process per file), since atime is often not kept
(``noatime``). Eviction deletes the files used least recently until the
folder is at 80% of the cap, so it runs rarely: the loader counts what it
writes and looks at the folder only when that count passes the cap or every
``CHECK_EVERY`` writes (other processes write there too).

Safety: only regular files of ours (``loader.ours_alone``) whose names match
our patterns are counted or deleted, links are never followed (``lstat``;
``unlink`` of a link removes the link), and a file that vanished meanwhile
(another process evicted it) is fine: a file evicted while some process
wants it is rebuilt by the loader's self-healing path.

Interrupted writes (issue 11, item 6): a writer killed midway (SIGKILL, an
OOM kill) leaves at most a ``.<name>_<random>.tmp`` file, never a partial
``.py`` (loader.py writes through ``os.replace``). Nothing reads those; each
time this process looks at the folder (its first write there, then every
``CHECK_EVERY`` writes) it deletes the ones older than
``STALE_TEMPORARY_SECONDS``, which no live writer still holds.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ENVIRONMENT", "CacheFile", "cache_files", "clear", "evict", "max_bytes", "note_write",
           "ours_alone", "remove_stale_temporaries", "touch"]

ENVIRONMENT = "RETROGRAD_CACHE_MAX_MB"
DEFAULT_MAX_MB = 1024
#: Eviction goes down to this fraction of the cap, so it does not run on every write.
LOW_WATER = 0.8
#: The folder is looked at after this many writes even if the count stays under the cap.
CHECK_EVERY = 256
#: A temporary file older than this was left by a killed writer.
STALE_TEMPORARY_SECONDS = 600.0

_NAME = r"[A-Za-z0-9_.-]+_[0-9a-f]{24}"
_SOURCE = re.compile(rf"^{_NAME}\.py$")
_TEMPORARY = re.compile(rf"^\.{_NAME}_[A-Za-z0-9_]+\.tmp$")   # loader._write_atomically
_BYTECODE = re.compile(rf"^{_NAME}\.[A-Za-z0-9_-]+\.pyc$")     # older versions' __pycache__


@dataclass(frozen=True)
class CacheFile:
    path: Path
    size: int
    mtime: float


def ours_alone(info: os.stat_result, is_kind=stat.S_ISREG) -> bool:
    """Of the kind asked (a regular file unless ``is_kind`` says otherwise), ours,
    and no other user can write it: the one trust test for what retrograd loads
    from, writes into or deletes (the dumps use it for their folders)."""
    if not is_kind(info.st_mode) or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return False
    return not hasattr(os, "getuid") or info.st_uid == os.getuid()


def max_bytes() -> int | None:
    """The cap in bytes from ``RETROGRAD_CACHE_MAX_MB``; ``None`` when it is 0."""
    text = os.environ.get(ENVIRONMENT, "").strip() or str(DEFAULT_MAX_MB)
    try:
        megabytes = float(text)
    except ValueError:
        megabytes = -1.0
    if not megabytes >= 0 or megabytes == float("inf"):
        raise ValueError(f"retrograd: {ENVIRONMENT}={text!r} must be a size in megabytes "
                         f"(0 turns the kernel cache's cap off)")
    return int(megabytes * 2**20) or None


def _scan(folder: Path, patterns: tuple[re.Pattern, ...], now: float) -> list[CacheFile]:
    """Regular files of ours in ``folder`` (not below) whose names match."""
    found = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return found
    for entry in entries:
        if not any(pattern.match(entry.name) for pattern in patterns):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue   # gone meanwhile
        fresh_temporary = (entry.name.endswith(".tmp")
                           and now - info.st_mtime < STALE_TEMPORARY_SECONDS)
        if ours_alone(info) and not fresh_temporary:
            found.append(CacheFile(Path(entry.path), info.st_size, info.st_mtime))
    return found


def cache_files(folder: Path) -> list[CacheFile]:
    """Our files in ``folder``, least recently used first: generated sources,
    temporaries a killed writer left, and bytecode older versions wrote."""
    now = time.time()
    files = _scan(folder, (_SOURCE, _TEMPORARY), now)
    bytecode = folder / "__pycache__"
    with contextlib.suppress(OSError):
        if ours_alone(os.lstat(bytecode), stat.S_ISDIR):
            files += _scan(bytecode, (_BYTECODE,), now)
    return sorted(files, key=lambda file: (file.mtime, file.path.name))


def _remove(files: list[CacheFile]) -> list[CacheFile]:
    removed = []
    for file in files:
        try:
            os.unlink(file.path)   # a link put there meanwhile: the link goes, not its target
        except FileNotFoundError:
            continue   # another process evicted it first
        except OSError:
            continue
        removed.append(file)
    return removed


def evict(folder: Path, cap: int, keep: frozenset[str] = frozenset()) -> tuple[list, int]:
    """Delete the least recently used files until the folder holds at most
    ``LOW_WATER * cap`` bytes (never the paths in ``keep``); returns what was
    removed and the bytes left."""
    files = cache_files(folder)
    total = sum(file.size for file in files)
    if total <= cap:
        return [], total
    chosen = []
    for file in files:
        if total <= LOW_WATER * cap:
            break
        if str(file.path) not in keep:
            chosen.append(file)
            total -= file.size
    removed = _remove(chosen)
    return removed, total


def clear(folder: Path) -> list[CacheFile]:
    """Delete all our files in ``folder`` (not fresh temporaries: a writer may
    be busy with one); returns what was removed."""
    removed = _remove(cache_files(folder))
    with contextlib.suppress(OSError):   # only if empty, and never through a link
        os.rmdir(folder / "__pycache__")
    return removed


def remove_stale_temporaries(folder: Path) -> list[CacheFile]:
    """Delete the temporary files killed writers left in ``folder`` (those older
    than ``STALE_TEMPORARY_SECONDS``: a live writer renames its own within
    seconds); returns what was removed."""
    stale = _scan(folder, (_TEMPORARY,), time.time())   # fresh ones are not listed
    return _remove(stale)


def touch(path: Path) -> None:
    """Mark ``path`` used now (its mtime), for least recently used eviction."""
    with contextlib.suppress(OSError):
        os.utime(path, follow_symlinks=False)


class _Budget:
    """What this process believes the folder holds, so it is scanned rarely."""

    def __init__(self):
        self.lock = threading.Lock()
        self.folder: str | None = None
        self.bytes = 0
        self.writes = 0


_BUDGET = _Budget()


def note_write(folder: Path, path: Path, size: int) -> None:
    """Count a file just written; when this process looks at the folder (first
    write there, every ``CHECK_EVERY`` writes, or past the cap), delete stale
    temporaries and evict past the cap."""
    cap = max_bytes()
    with _BUDGET.lock:
        if _BUDGET.folder != str(folder):   # first write there: look once
            _BUDGET.folder, _BUDGET.writes = str(folder), 0
            remove_stale_temporaries(folder)
            _BUDGET.bytes = sum(f.size for f in cache_files(folder))
        else:
            _BUDGET.bytes += size
            _BUDGET.writes += 1
        due = _BUDGET.writes >= CHECK_EVERY
        if due:
            remove_stale_temporaries(folder)
            _BUDGET.writes = 0
        if cap is not None and (due or _BUDGET.bytes > cap):
            _, _BUDGET.bytes = evict(folder, cap, keep=frozenset({str(path)}))
            _BUDGET.writes = 0
